"""Linear + cross-entropy over the labelled positions without the [N, vocab] logits.

`chunked_linear_cross_entropy(hidden, weight, bias, target)` is
`F.cross_entropy(hidden @ weight.T + bias, target, reduction="sum") / N` (0 when N == 0), computed
over vocabulary chunks. The log-sum-exp runs online, as in flash attention: a running max `m`, a
running sum `s` of exp(z - m), and the target logit picked up in whichever chunk holds it.

The gradient of the hidden states, `sum_v softmax_v * W_v - W_target`, is the same online sum
(flash attention's output with q = h and k = v = W), so the forward accumulates it too: no logit
is computed twice for it, and the backward only scales it by the incoming gradient. Gradients of
the weight and bias need the final log-sum-exp of every row, so the backward recomputes each
chunk's logits for them, and only when the weight or bias trains (the BERT policy freezes the tied
decoder, so the usual step never pays for it).

Two implementations share this autograd node: the PyTorch reference below (chunked, one op at a
time) and the Triton kernels in `triton_linear_ce.py`. A tied decoder weight is the embedding
Parameter itself, so its gradient accumulates into the one tensor.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 4096
#: widest hidden size the Triton kernels take (they hold a whole row of h in one tile)
TRITON_MAX_HIDDEN = 1024


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: target [N] expected, got {tuple(target.shape)} for N={hidden.shape[0]}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias [V] expected, got {tuple(bias.shape)}")


# --------------------------------------------------------------------------------------------
# PyTorch reference: the same two passes as the kernels, chunked, one op at a time.


def reference_forward(hidden, weight, bias, target, chunk: int, with_grad_h: bool):
    """(per-row loss fp32 [N], log-sum-exp fp32 [N], unscaled d(sum loss)/dh fp32 [N, H] or None)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    # The target logit as one row-wise dot product, not a gather per chunk; rounded to the logits'
    # dtype, as the matmul rounds the logits it is subtracted from.
    w_t = weight[target].float()
    zt = (hidden.float() * w_t).sum(1)
    if bias is not None:
        zt += bias[target].float()
    zt = zt.to(hidden.dtype).float()
    m = torch.full((n,), float("-inf"), device=dev)
    s = torch.zeros(n, device=dev)
    acc = torch.zeros(n, hidden.shape[1], device=dev) if with_grad_h else None
    if n == 0:
        return zt, m, acc
    # Few, in-place ops per chunk: on a busy CPU every op costs a scheduling round trip.
    for v0 in range(0, v, chunk):
        w = weight[v0:v0 + chunk]
        z = (hidden @ w.T if bias is None else torch.addmm(bias[v0:v0 + chunk], hidden, w.T)).float()
        m_new = torch.maximum(m, z.amax(1))
        e = z.sub_(m_new[:, None]).exp_()
        alpha = (m - m_new).exp_()
        s = s.mul_(alpha).add_(e.sum(1))
        if acc is not None:
            acc.mul_(alpha[:, None])
            if w.dtype == torch.float32:
                acc.addmm_(e, w)
            else:
                acc += e.to(w.dtype) @ w
        m = m_new
    lse = m + torch.log(s)
    grad_h = acc.div_(s[:, None]).sub_(w_t) if acc is not None else None
    return lse - zt, lse, grad_h


def reference_weight_grad(hidden, weight, bias, target, lse, scale, chunk: int, need_w: bool, need_b: bool):
    """d(scale * sum loss)/d(weight, bias); `scale` is a 0-dim tensor (grad_output / N)."""
    gw = torch.zeros_like(weight) if need_w else None
    gb = torch.zeros(weight.shape[0], device=weight.device, dtype=bias.dtype) if need_b else None
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    for v0 in range(0, weight.shape[0], chunk):
        w = weight[v0:v0 + chunk]
        z = (hidden @ w.T if bias is None else torch.addmm(bias[v0:v0 + chunk], hidden, w.T)).float()
        p = torch.exp(z - lse[:, None])
        local = target - v0
        inside = (local >= 0) & (local < w.shape[0])
        p[rows[inside], local[inside]] -= 1.0
        p *= scale
        if gw is not None:
            gw[v0:v0 + chunk] = p.to(hidden.dtype).T @ hidden
        if gb is not None:
            gb[v0:v0 + chunk] = p.sum(0).to(gb.dtype)
    return gw, gb


class _Reference:
    forward = staticmethod(reference_forward)
    weight_grad = staticmethod(reference_weight_grad)


# --------------------------------------------------------------------------------------------
# The autograd node both implementations plug into.


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk, impl):
        need_h = ctx.needs_input_grad[0]
        loss_rows, lse, grad_h = impl.forward(hidden, weight, bias, target, chunk, need_h)
        n = target.numel()
        # sum / N; with no labelled position the loss is 0 (and so are the gradients), not NaN.
        loss = loss_rows.sum() / max(n, 1)
        ctx.impl, ctx.chunk, ctx.n = impl, chunk, n
        ctx.save_for_backward(hidden, weight, bias, target, lse, grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, lse, grad_h = ctx.saved_tensors
        # A 0-dim tensor, not .item(): reading it on the host would be a GPU sync point.
        scale = grad_loss.float() / max(ctx.n, 1)
        gh = (grad_h * scale).to(hidden.dtype) if grad_h is not None else None
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        gw = gb = None
        if need_w or need_b:
            gw, gb = ctx.impl.weight_grad(hidden, weight, bias, target, lse, scale, ctx.chunk, need_w, need_b)
        return gh, gw, gb, None, None, None


def linear_cross_entropy(hidden, weight, bias, target, chunk: int = DEFAULT_CHUNK, impl=_Reference) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `target`, vocabulary-chunked.

    hidden [N, H], weight [V, H], bias [V] or None, target [N] with every id in [0, V) (gather the
    labelled positions first). Returns a 0-dim fp32 loss: sum over rows / N, or 0 when N == 0.
    """
    _check(hidden, weight, bias, target)
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, int(chunk), impl)


def chunked_linear_cross_entropy(hidden, weight, bias, target, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The PyTorch reference (chunked, unfused); same signature as the Triton path."""
    return linear_cross_entropy(hidden, weight, bias, target, chunk, _Reference)
