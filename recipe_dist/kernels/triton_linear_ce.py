"""Triton kernels for `linear_ce`: the same two passes as its PyTorch reference, fused.

Forward (one program per block of rows): walks the vocabulary in blocks; each block's logits
z = h @ W_blk^T + b live only in registers, feeding the online log-sum-exp, the target logit and,
when the hidden states need a gradient, the flash-attention-style sum of exp(z - m) @ W_blk. It
writes the per-row loss, the log-sum-exp and d(sum loss)/dh; nothing of size [N, V] is stored.

Weight gradient (one program per block of vocabulary rows): walks the rows, recomputes its logits,
p = softmax - onehot, and accumulates p^T @ h and sum(p). Each output block is owned by a single
program, so there are no atomics and the result does not depend on scheduling.

The full hidden width sits in one tile (BLOCK_D = next power of two >= H), which fits the encoders
this package trains (H <= 1024); `kernels.fused=auto` uses the reference for wider ones.
Block sizes are heuristics and were checked for correctness only (under TRITON_INTERPRET=1);
no GPU tuning was done here.

Import this module only when Triton runs: `linear_ce` and the reference never import triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .linear_ce import TRITON_MAX_HIDDEN as MAX_HIDDEN


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b accumulated in fp32. F32 computes it in IEEE fp32 (no TF32): for fp32 inputs, and for
    bf16 ones under TRITON_INTERPRET=1, whose dot multiplies bf16's raw uint16 storage (Triton
    3.x); bf16 values upcast exactly, so the products are the ones the GPU's bf16 dot forms."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fwd_kernel(H, W, B, T, LOSS, LSE, GH, N, V, D, stride_h, stride_w, stride_g,
                HAS_BIAS: tl.constexpr, WITH_GRAD: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    h = tl.load(H + rows[:, None] * stride_h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    t = tl.load(T + rows, mask=rmask, other=0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        w = tl.load(W + cols[:, None] * stride_w + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        z = _dot(h, tl.trans(w), IEEE)
        if HAS_BIAS:
            z += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, 1)
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), 1)
        if WITH_GRAD:
            acc = acc * alpha[:, None] + _dot(e.to(w.dtype), w, IEEE)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LOSS + rows, lse - zt, mask=rmask)
    tl.store(LSE + rows, lse, mask=rmask)
    if WITH_GRAD:
        hm = rmask[:, None] & dmask[None, :]
        w_t = tl.load(W + t[:, None] * stride_w + d[None, :], mask=hm, other=0.0).to(tl.float32)
        tl.store(GH + rows[:, None] * stride_g + d[None, :], acc / s[:, None] - w_t, mask=hm)


@triton.jit
def _wgrad_kernel(H, W, B, T, LSE, G, GW, GB, N, V, D, stride_h, stride_w, stride_gw,
                  HAS_BIAS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    w = tl.load(W + cols[:, None] * stride_w + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    # grad_output / N, read on the device: no host sync in the backward.
    scale = tl.load(G).to(tl.float32)
    acc_w = tl.zeros([BLOCK_V, BLOCK_D], tl.float32)
    acc_b = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        h = tl.load(H + rows[:, None] * stride_h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        t = tl.load(T + rows, mask=rmask, other=-1)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        z = _dot(h, tl.trans(w), IEEE)
        if HAS_BIAS:
            z += b[None, :]
        p = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
        p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0) * scale
        if NEED_W:
            acc_w += _dot(tl.trans(p.to(h.dtype)), h, IEEE)
        if NEED_B:
            acc_b += tl.sum(p, 0)
    if NEED_W:
        tl.store(GW + cols[:, None] * stride_gw + d[None, :], acc_w, mask=cmask[:, None] & dmask[None, :])
    if NEED_B:
        tl.store(GB + cols, acc_b, mask=cmask)


def _ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _blocks(d: int) -> tuple[int, int, int, int]:
    if d > MAX_HIDDEN:
        raise ValueError(f"linear_cross_entropy (triton): hidden size {d} > {MAX_HIDDEN} is not supported; set kernels.fused=off")
    block_d = max(16, triton.next_power_of_2(d))
    # Keep h, the weight block and the fp32 accumulator near the register budget as H grows.
    block_n, block_v = (64, 64) if block_d <= 256 else (32, 32) if block_d <= 512 else (16, 32)
    return block_n, block_v, block_d, 4 if block_d <= 256 else 8


def triton_forward(hidden, weight, bias, target, chunk: int, with_grad_h: bool):
    """Same contract as `linear_ce.reference_forward` (`chunk` is the reference's; blocks are fixed)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    grad_h = torch.empty(n, d, device=hidden.device, dtype=torch.float32) if with_grad_h else None
    if n == 0:
        return loss, lse, grad_h
    block_n, block_v, block_d, warps = _blocks(d)
    _fwd_kernel[(triton.cdiv(n, block_n),)](
        hidden, weight, bias if bias is not None else weight, target.contiguous(), loss, lse,
        grad_h if grad_h is not None else loss, n, v, d, hidden.stride(0), weight.stride(0), d,
        HAS_BIAS=bias is not None, WITH_GRAD=with_grad_h, IEEE=_ieee(hidden),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
    )
    return loss, lse, grad_h


def triton_weight_grad(hidden, weight, bias, target, lse, scale, chunk: int, need_w: bool, need_b: bool):
    """Same contract as `linear_ce.reference_weight_grad`."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    gw = torch.zeros(v, d, device=weight.device, dtype=torch.float32) if need_w else None
    gb = torch.zeros(v, device=weight.device, dtype=torch.float32) if need_b else None
    if n > 0:
        block_n, block_v, block_d, warps = _blocks(d)
        _wgrad_kernel[(triton.cdiv(v, block_v),)](
            hidden, weight, bias if bias is not None else weight, target.contiguous(), lse, scale.reshape(1).contiguous(),
            gw if gw is not None else lse, gb if gb is not None else lse, n, v, d,
            hidden.stride(0), weight.stride(0), d,
            HAS_BIAS=bias is not None, NEED_W=need_w, NEED_B=need_b, IEEE=_ieee(hidden),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
        )
    return (gw.to(weight.dtype) if gw is not None else None), (gb.to(bias.dtype) if gb is not None else None)


class TritonImpl:
    forward = staticmethod(triton_forward)
    weight_grad = staticmethod(triton_weight_grad)
