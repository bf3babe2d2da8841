"""Deterministic text-trigger insertion (method.md section 3).

The trigger word is inserted at a word position drawn from an RNG seeded per sample, so the
same (seed, sample index) always gives the same triggered text, on any machine and in any
process: the seed is derived with SHA-256, never with Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
import random

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
