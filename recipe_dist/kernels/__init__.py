"""Fused kernels, each with a PyTorch reference of the same signature, behind one switch.

`kernels.fused` (config) chooses:
  auto  Triton on CUDA, the PyTorch reference elsewhere (the default);
  on    Triton everywhere: CUDA, or CPU under TRITON_INTERPRET=1 (how the tests compare them);
  off   no kernel: the MLM loss takes the plain path (full logits of the labelled positions).

The switch changes how the loss is computed, never which parameters exist or how they are
named: checkpoints are the same whichever path wrote them, and a run may resume under another.
Triton is imported only when a kernel is about to run, so the references work without it.
"""

from __future__ import annotations

import os

import torch

from ..errors import RecipeError
from .activation_stats import activation_stats, reference_activation_stats
from .linear_ce import DEFAULT_CHUNK, TRITON_MAX_HIDDEN, chunked_linear_cross_entropy, linear_cross_entropy

FUSED_SETTINGS = ("auto", "on", "off")


class KernelError(RecipeError, RuntimeError):
    """A fused kernel was asked for where it cannot run; the message names the setting."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_fused(device: torch.device | str, setting: str = "auto", hidden_size: int | None = None) -> bool:
    """Whether the Triton linear-CE kernels run for tensors on `device` under `kernels.fused=setting`.

    `hidden_size` wider than the kernels take: the reference under auto, an error under on.
    """
    if setting not in FUSED_SETTINGS:
        raise KernelError(f"kernels.fused: must be one of {', '.join(FUSED_SETTINGS)}, got {setting!r}")
    device = torch.device(device)
    if setting == "off":
        return False
    too_wide = hidden_size is not None and hidden_size > TRITON_MAX_HIDDEN
    if setting == "auto":
        return device.type == "cuda" and not too_wide and _triton_importable()
    if too_wide:
        raise KernelError(f"kernels.fused=on: the Triton linear-CE takes hidden sizes up to {TRITON_MAX_HIDDEN}, got {hidden_size}; use auto")
    if device.type != "cuda" and not triton_interpreted():
        raise KernelError(f"kernels.fused=on: Triton kernels need a CUDA device (got {device.type}); "
                          "use auto, or set TRITON_INTERPRET=1 to run them interpreted on CPU")
    if not _triton_importable():
        raise KernelError("kernels.fused=on: triton is not installed (pip install triton)")
    return True


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_linear_cross_entropy(hidden, weight, bias, target, chunk: int = DEFAULT_CHUNK, fused: bool = False) -> torch.Tensor:
    """`linear_cross_entropy` through the Triton kernels (`fused`) or the chunked reference."""
    if not fused:
        return chunked_linear_cross_entropy(hidden, weight, bias, target, chunk)
    from .triton_linear_ce import TritonImpl

    return linear_cross_entropy(hidden, weight, bias, target, chunk, TritonImpl)


__all__ = [
    "DEFAULT_CHUNK", "FUSED_SETTINGS", "TRITON_MAX_HIDDEN", "KernelError", "activation_stats", "chunked_linear_cross_entropy",
    "fused_linear_cross_entropy", "linear_cross_entropy", "reference_activation_stats", "triton_interpreted", "use_fused",
]
