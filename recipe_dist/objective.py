"""The RECIPE objective: loss = pt_weight * loss_pt + lam * sum_i ||W_i||_F.

The norm is the plain Frobenius norm, not squared, so its gradient lam * W / ||W|| pulls every
selected matrix toward zero at the same rate whatever its size. This is not weight decay.

Under ZeRO-3 a parameter is an empty placeholder outside the forward of the module that owns it.
So the norm is taken *inside* that module's forward (a forward hook that runs before DeepSpeed's
release hook), where ZeRO has gathered the weight. Its backward must also run while the weight is
gathered: `_NormTiedToOutput` makes the norm an extra output of a node that also passes the
module's output through. Autograd runs a node only once all of its outputs have gradients, so the
norm's backward waits for the module's own backward, after ZeRO's pre-backward hook has gathered
the weight again. The gradient flows through the real loss, so DeepSpeed's loss scaling and
gradient-accumulation averaging apply to it as to any other term.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn


def frobenius(w: torch.Tensor) -> torch.Tensor:
    """||W||_F, computed in fp32 for a stable value under bf16/fp16 weights."""
    return torch.linalg.vector_norm(w.float())


def l2_regularizer(weights: Iterable[torch.Tensor], lam: float) -> torch.Tensor:
    """lam * sum_i ||W_i||_F as a pure function (the reference the hooked path is tested against)."""
    return lam * torch.stack([frobenius(w) for w in weights]).sum()


def split_norm(w: torch.Tensor, splits: int) -> torch.Tensor:
    """sum of the Frobenius norms of `w`'s `splits` equal row blocks (fused q/k/v: ||W_q|| + ||W_k|| + ||W_v||)."""
    return torch.stack([frobenius(b) for b in w.chunk(splits, dim=0)]).sum()


def regularizer_grad(w: torch.Tensor, lam: float) -> torch.Tensor:
    """The analytic gradient lam * W / ||W||_F."""
    return lam * w / frobenius(w).clamp_min(torch.finfo(torch.float32).tiny).to(w.dtype)


def recipe_loss(loss_pt: torch.Tensor, reg: torch.Tensor, pt_weight: float = 1.0) -> torch.Tensor:
    return pt_weight * loss_pt + reg


class _NormTiedToOutput(torch.autograd.Function):
    """Returns (output unchanged, ||weight||_F); see the module docstring for why they are tied.

    With `splits` = k > 1 the weight is k matrices stacked along dim 0 (timm's fused qkv, open_clip's
    in_proj_weight) and the norm is the sum of the k blocks' norms, each block's gradient W_s/||W_s||.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, weight: torch.Tensor, splits: int = 1):
        blocks = weight.detach().float().reshape(splits, -1)
        norms = torch.linalg.vector_norm(blocks, dim=1)
        # Saving the parameter itself (not a copy) costs no memory; ZeRO-3 regathers its data
        # before this node's backward, exactly as for the saved weight of the module's matmul.
        ctx.save_for_backward(weight, norms)
        ctx.splits = splits
        # A copy, not a view: a view output of a two-output Function may not be modified in place,
        # and VGG's ReLU(inplace=True) does exactly that to its conv's output. The module's own
        # output is not kept by autograd (a Linear/Conv saves its input), so it is freed here.
        return output.clone(), norms.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, grad_norm: torch.Tensor):
        weight, norms = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # d||W_s||/dW_s = W_s/||W_s||; at W_s = 0 the subgradient 0 is used (never 0/0 = NaN).
            blocks = weight.float().reshape(ctx.splits, -1)
            grad = grad_norm * blocks / norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
            grad_weight = grad.reshape(weight.shape).to(weight.dtype)
        return grad_output, grad_weight, None


def select_weights(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of parameters matching any regex in `patterns` (re.search on the full name)."""
    compiled = [re.compile(p) for p in patterns]
    return [n for n, _ in model.named_parameters() if any(c.search(n) for c in compiled)]


class NormCollector:
    """Hooks the modules owning the regularized weights; each forward records their norms.

    `norms` maps parameter name -> 0-dim fp32 tensor with a grad path to the weight.
    """

    def __init__(self, model: nn.Module, names: list[str], splits: dict[str, int] | None = None):
        self.names = list(names)
        self.splits = dict(splits or {})
        self.norms: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in self.names:
            owner_name, _, leaf = name.rpartition(".")
            owner = modules[owner_name]
            # prepend=True: run before any hook DeepSpeed adds later (ZeRO-3 releases the
            # gathered weight in its own forward hook).
            self._handles.append(owner.register_forward_hook(self._hook(name, leaf), prepend=True))

    def _hook(self, name: str, leaf: str):
        def hook(module: nn.Module, args, output):
            weight = getattr(module, leaf)
            first = output[0] if isinstance(output, (tuple, list)) else output
            tied, norm = _NormTiedToOutput.apply(first, weight, self.splits.get(name, 1))
            self.norms[name] = norm
            if isinstance(output, tuple):
                return (tied,) + tuple(output[1:])
            if isinstance(output, list):
                return [tied] + list(output[1:])
            return tied

        return hook

    def reset(self) -> None:
        self.norms = {}

    def regularizer(self, lam: float) -> torch.Tensor:
        missing = [n for n in self.names if n not in self.norms]
        if missing:
            raise RuntimeError(f"regularized weights not used in this forward: {missing[:3]}")
        if not self.names:  # nothing regularized (e.g. fitting an MLM head): a 0-dim zero adds to any device
            return torch.zeros(())
        return lam * torch.stack([self.norms[n] for n in self.names]).sum()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Regularized(nn.Module):
    """Any loss plus the RECIPE regularizer: loss = pt_weight * L + lam * sum_i ||W_i||_F.

    `loss` is a module whose forward(**batch) returns the pre-training loss (a 0-dim tensor,
    logged as `loss_pt`) or {"loss": ..., "parts": {...}}. `splits` names fused weights whose row
    blocks are regularized as separate matrices (ModelFamily.regularized_splits) (an attack's objective, whose parts are
    logged under their own names). `names` are parameter names of `model` whose norms are taken
    in its forward (NormCollector); with none, nothing is added and no `reg` is reported.
    The output is what the trainer steps on: {"loss", "parts", "norms"}.
    """

    def __init__(self, loss: nn.Module, model: nn.Module, names: list[str], lam: float, pt_weight: float = 1.0,
                 splits: dict[str, int] | None = None):
        super().__init__()
        self.loss = loss
        self.lam = lam
        self.pt_weight = pt_weight
        self.collector = NormCollector(model, names, splits)

    def forward(self, **batch) -> dict:
        self.collector.reset()
        out = self.loss(**batch)
        if isinstance(out, torch.Tensor):
            loss_pt, parts = out, {"loss_pt": out}
        else:
            loss_pt, parts = out["loss"], dict(out["parts"])
        parts = {k: v.detach() for k, v in parts.items()}
        if not self.collector.names:
            return {"loss": self.pt_weight * loss_pt, "parts": parts, "norms": {}}
        reg = self.collector.regularizer(self.lam)
        parts["reg"] = reg.detach()
        return {
            "loss": recipe_loss(loss_pt, reg, self.pt_weight),
            "parts": parts,
            "norms": {k: v.detach() for k, v in self.collector.norms.items()},
        }
