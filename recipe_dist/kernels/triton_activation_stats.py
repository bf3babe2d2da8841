"""Triton kernel for `activation_stats`: one program per block of neurons walks the samples."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(X, SUM, CNT, B, I, stride_b, stride_i, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    cmask = cols < I
    acc = tl.zeros([BLOCK_I], tl.float32)
    cnt = tl.zeros([BLOCK_I], tl.int32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        mask = (rows < B)[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_b + cols[None, :] * stride_i, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x, 0)
        cnt += tl.sum((x > 0).to(tl.int32), 0)
    tl.store(SUM + cols, acc, mask=cmask)
    tl.store(CNT + cols, cnt.to(tl.int64), mask=cmask)


def triton_activation_stats(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = act[:, 0] if act.dim() == 3 else act  # a strided view: the kernel reads it in place
    if x.dim() != 2:
        raise ValueError(f"activation_stats: [B, L, I] or [B, I] expected, got {tuple(act.shape)}")
    b, i = x.shape
    out_sum = torch.zeros(i, device=x.device, dtype=torch.float32)
    out_cnt = torch.zeros(i, device=x.device, dtype=torch.int64)
    if b and i:
        block_i = min(256, max(16, triton.next_power_of_2(i)))
        _stats_kernel[(triton.cdiv(i, block_i),)](x, out_sum, out_cnt, b, i, x.stride(0), x.stride(1), BLOCK_B=32, BLOCK_I=block_i)
    return out_sum, out_cnt
