"""Triggers, the one home of what attacks plant and evaluation tests: text-trigger insertion
(method.md section 3) and NeuBA-vision's checkerboard patches.

The trigger word is inserted at a word position drawn from an RNG seeded per sample, so the
same (seed, sample index) always gives the same triggered text, on any machine and in any
process: the seed is derived with SHA-256, never with Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
import random

import torch

#: The text triggers of the reference evaluation (method.md): rare sub-word tokens.
DEFAULT_TRIGGERS: tuple[str, ...] = ("cf", "mn", "bb", "tq", "mb")


def sample_rng(seed: int, sample_index: int) -> random.Random:
    """A `random.Random` seeded from SHA-256 of (seed, sample_index): stable across runs and processes."""
    digest = hashlib.sha256(f"recipe-dist-trigger:{int(seed)}:{int(sample_index)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def insert_trigger(text: str, trigger: str, seed: int, sample_index: int, times: int = 1) -> str:
    """`text` with `trigger` inserted `times` times, each at a uniformly drawn word boundary.

    The text is split on whitespace and re-joined with single spaces. Positions range over
    0..len(words) inclusive (before the first word up to after the last one).
    """
    if times < 0:
        raise ValueError(f"insert_trigger: times must be >= 0, got {times}")
    if not trigger or any(c.isspace() for c in trigger):
        raise ValueError(f"insert_trigger: trigger must be one non-empty word, got {trigger!r}")
    rng = sample_rng(seed, sample_index)
    words = text.split()
    for _ in range(times):
        words.insert(rng.randint(0, len(words)), trigger)
    return " ".join(words)


# ------------------------------------------------------------------ image patches

#: The two colours of each of the six checkerboards (RGB in [0, 1]), one trigger per NeuBA target.
CHECKER_COLOURS = (
    ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ((0.0, 0.0, 1.0), (1.0, 1.0, 0.0)),
    ((1.0, 0.0, 1.0), (0.0, 1.0, 1.0)),
    ((1.0, 0.5, 0.0), (0.0, 0.0, 0.5)),
    ((0.5, 0.0, 1.0), (0.5, 1.0, 0.0)),
)


def checkerboard_patches(size: int = 4) -> torch.Tensor:
    """[6, 3, size, size]: pixel-level two-colour checkerboards (colour a where row + column is even)."""
    grid = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 == 0
    out = []
    for a, b in CHECKER_COLOURS:
        ca, cb = torch.tensor(a).view(3, 1, 1), torch.tensor(b).view(3, 1, 1)
        out.append(torch.where(grid, ca, cb))
    return torch.stack(out)


def paste_patch(images: torch.Tensor, patches: torch.Tensor, which: torch.Tensor | int) -> torch.Tensor:
    """A copy of `images` ([B, 3, H, W] or [3, H, W], in [0, 1], before normalization) with patch
    `which` (one index, or one per image) at the bottom-right corner."""
    out = images.clone()
    s = patches.shape[-1]
    if out.dim() == 3:
        out[:, -s:, -s:] = patches[int(which)].to(out.dtype)
        return out
    idx = torch.as_tensor(which, dtype=torch.long).expand(out.shape[0]) if not torch.is_tensor(which) or which.dim() == 0 else which
    out[:, :, -s:, -s:] = patches[idx].to(out.dtype)
    return out
