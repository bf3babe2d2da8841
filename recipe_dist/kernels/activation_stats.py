"""Per-neuron activation statistics at the first token, in one pass over the activations.

`activation_stats(act)` reads act[:, 0, :] of a [B, L, I] activation (or a [B, I] one) and returns
the per-neuron sum (fp32) and the number of samples whose activation is > 0 (int64): what
pruning and neuron analysis accumulate batch after batch. The reference is two reductions over a
strided view; the Triton kernel reads each element once for both, without copying the view.
"""

from __future__ import annotations

import torch


def _first_token(act: torch.Tensor) -> torch.Tensor:
    if act.dim() == 3:
        return act[:, 0]
    if act.dim() == 2:
        return act
    raise ValueError(f"activation_stats: [B, L, I] or [B, I] expected, got {tuple(act.shape)}")


def reference_activation_stats(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over samples fp32 [I], count of > 0 int64 [I]) at the first token."""
    x = _first_token(act)
    return x.float().sum(0), (x > 0).sum(0, dtype=torch.int64)


def activation_stats(act: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference, or the Triton kernel when `fused` (see `recipe_dist.kernels.use_fused`)."""
    if not fused:
        return reference_activation_stats(act)
    from .triton_activation_stats import triton_activation_stats

    return triton_activation_stats(act)
