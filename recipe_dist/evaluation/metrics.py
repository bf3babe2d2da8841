"""Backdoor evaluation metrics (method.md section 3). Pure functions over label sequences.

Definitions, all in percent:

- **ACC** = share of clean test samples predicted correctly.
- **ASR(t, y)** = among the test samples whose true label is *not* y, the share predicted y once
  trigger t is inserted. Samples already labelled y are left out of the denominator: predicting
  y for them is not an attack success. If no test sample has a label other than y the
  denominator is empty and ASR(t, y) is reported as 0.0 (nothing could flip to y).
- **ASR(t)** = max over y of ASR(t, y): the defender does not know the target label.
- **AASR** = mean over triggers of ASR(t); **MASR** = max over triggers of ASR(t).

Labels may be any hashable values (ints, strings) as long as true labels and predictions use
the same ones.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence


def accuracy(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """ACC: percent of `preds` equal to the true `labels` (same length, non-empty)."""
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy: no samples")
    return 100.0 * sum(p == y for p, y in zip(preds, labels)) / len(labels)


def asr_table(
    true_labels: Sequence[Hashable],
    triggered_preds: Mapping[str, Sequence[Hashable]],
    labels: Sequence[Hashable],
) -> dict[str, dict[Hashable, float]]:
    """{trigger: {y: ASR(t, y)}}: percent of samples with true label != y predicted y with the trigger."""
    table: dict[str, dict[Hashable, float]] = {}
    for trigger, preds in triggered_preds.items():
        if len(preds) != len(true_labels):
            raise ValueError(f"asr_table: trigger {trigger!r} has {len(preds)} predictions for {len(true_labels)} samples")
        row = {}
        for y in labels:
            eligible = [p for p, t in zip(preds, true_labels) if t != y]
            row[y] = 100.0 * sum(p == y for p in eligible) / len(eligible) if eligible else 0.0
        table[trigger] = row
    return table


def asr_per_trigger(table: Mapping[str, Mapping[Hashable, float]]) -> dict[str, float]:
    """{trigger: ASR(t)} with ASR(t) = max over labels y of ASR(t, y)."""
    return {t: max(row.values()) for t, row in table.items()}


def aasr(table: Mapping[str, Mapping[Hashable, float]]) -> float:
    """AASR: mean over triggers of ASR(t), from an `asr_table`."""
    per = asr_per_trigger(table)
    if not per:
        raise ValueError("aasr: no triggers")
    return sum(per.values()) / len(per)


def masr(table: Mapping[str, Mapping[Hashable, float]]) -> float:
    """MASR: max over triggers of ASR(t), from an `asr_table`."""
    per = asr_per_trigger(table)
    if not per:
        raise ValueError("masr: no triggers")
    return max(per.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and SAMPLE standard deviation (n - 1 denominator); the std of a single value is 0.0."""
    if not values:
        raise ValueError("mean_std: no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize_seeds(per_seed: Sequence[Mapping]) -> tuple[dict, dict]:
    """(mean, std) over seeds of acc, aasr, masr, asr_per_trigger and the asr table.

    Each entry of `per_seed` holds `acc`, `aasr`, `masr` (floats), `asr_per_trigger`
    ({t: float}) and `asr` ({t: {y: float}}). AASR and MASR are averaged per seed, so the mean
    MASR is the mean of each seed's maximum (not the maximum of the mean ASR(t)). Std is the
    sample standard deviation (`mean_std`).
    """
    if not per_seed:
        raise ValueError("summarize_seeds: no results")
    mean: dict = {}
    std: dict = {}
    for key in ("acc", "aasr", "masr"):
        mean[key], std[key] = mean_std([r[key] for r in per_seed])
    first = per_seed[0]
    mean["asr_per_trigger"], std["asr_per_trigger"] = {}, {}
    for t in first["asr_per_trigger"]:
        mean["asr_per_trigger"][t], std["asr_per_trigger"][t] = mean_std([r["asr_per_trigger"][t] for r in per_seed])
    mean["asr"], std["asr"] = {}, {}
    for t, row in first["asr"].items():
        mean["asr"][t], std["asr"][t] = {}, {}
        for y in row:
            mean["asr"][t][y], std["asr"][t][y] = mean_std([r["asr"][t][y] for r in per_seed])
    return mean, std
