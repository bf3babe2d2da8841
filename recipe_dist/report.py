"""Run report: report.md with PNG plots, built from the run's own TensorBoard files.

The curves are read back from tb/ rather than taken from the trainer's memory, so a report can
be rebuilt for any finished (or resumed) run with `recipe-dist report RUN_DIR`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import yaml
from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot state
from matplotlib.ticker import MaxNLocator

from .errors import RecipeError
from .metrics import read_scalars

EVAL_KEYS = ("acc", "aasr", "masr", "asr_per_trigger")
PLOTS = ("loss.png", "norms.png", "asr.png")
# Logged under train/ but not loss parts: no panel in loss.png.
NOT_LOSSES = {"lr", "samples_per_second", "data_wait_fraction"}


class ReportError(RecipeError, ValueError):
    """An evaluation handed to the report lacks a key or has the wrong shape."""


def short_name(param: str) -> str:
    """'bert.encoder.layer.0.intermediate.dense.weight' -> 'layer 0 intermediate.dense'."""
    name = param.removesuffix(".weight")
    m = re.search(r"(?:^|\.)(?:layers?|blocks?|h)\.(\d+)\.(.+)$", name)
    return f"layer {m.group(1)} {m.group(2)}" if m else name


def _series(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    # A resumed run can log a step twice; the later value wins, and steps come out sorted.
    by_step = dict(points)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _loss_parts(scalars: dict) -> list[str]:
    parts = [t.removeprefix("train/") for t in scalars if t.startswith("train/")]
    parts = [p for p in parts if p not in NOT_LOSSES]
    # RECIPE's two terms first, the total last, any other parts (attack L1..L3) in between.
    rank = {"loss_pt": 0, "reg": 1, "loss": 3}
    return sorted(parts, key=lambda p: (rank.get(p, 2), p))


def _load(path: Path, parse) -> dict:
    # Both files are optional: a run stopped early (train.stop_at_step) has no summary.json.
    return (parse(path.read_text()) or {}) if path.is_file() else {}


def _check_evals(evals: dict[str, dict]) -> None:
    for name, ev in evals.items():
        if not isinstance(ev, dict):
            raise ReportError(f"evals['{name}']: expected an eval.json dict, got {type(ev).__name__}")
        for key in EVAL_KEYS:
            if key not in ev:
                raise ReportError(f"evals['{name}']: missing key '{key}' (expected {', '.join(EVAL_KEYS)})")
        if not isinstance(ev["asr_per_trigger"], dict):
            raise ReportError(f"evals['{name}']: 'asr_per_trigger' must map trigger -> ASR(t)")


def _pm(ev: dict, key: str, trigger: str | None = None) -> str:
    """'91.20' or '91.20 ± 0.35' when the evaluation averaged several seeds."""
    value = ev[key] if trigger is None else ev[key].get(trigger)
    if value is None:
        return "—"
    std = ev.get("std", {}).get(key)
    if trigger is not None and isinstance(std, dict):
        std = std.get(trigger)
    return f"{value:.2f} ± {std:.2f}" if isinstance(std, (int, float)) and std > 0 else f"{value:.2f}"


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # Figure owns no window: dropping it is closing it


def _plot_losses(scalars: dict, parts: list[str], path: Path) -> None:
    # One panel per part: loss_pt (~2) and reg (sum of norms, often hundreds) share no scale.
    fig = Figure(figsize=(7, 2.2 * len(parts)))
    axes = fig.subplots(len(parts), 1, sharex=True, squeeze=False)[:, 0]
    for ax, part in zip(axes, parts):
        ax.plot(*_series(scalars[f"train/{part}"]), color="tab:blue")
        ax.set_ylabel(part)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def _plot_norms(scalars: dict, tags: list[str], path: Path) -> None:
    # Absolute norms, and each relative to its first log so layers of different size compare.
    fig = Figure(figsize=(11, 4))
    ax_abs, ax_rel = fig.subplots(1, 2)
    for tag in tags:
        steps, values = _series(scalars[tag])
        label = short_name(tag.removeprefix("reg/norm/"))
        ax_abs.plot(steps, values, label=label)
        ax_rel.plot(steps, [v / values[0] if values[0] else math.nan for v in values], label=label)
    ax_abs.set_ylabel(r"$\|W\|_F$")
    ax_rel.set_ylabel(r"$\|W\|_F$ / first logged")
    for ax in (ax_abs, ax_rel):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_rel.legend(fontsize=7, ncol=1 + len(tags) // 16, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, path)


def _plot_asr(evals: dict[str, dict], triggers: list[str], path: Path) -> None:
    groups = [*triggers, "AASR", "MASR"]
    width = 0.8 / len(evals)
    fig = Figure(figsize=(max(6, 0.9 * len(groups) * len(evals)), 4))
    ax = fig.subplots()
    for i, (name, ev) in enumerate(evals.items()):
        values = [ev["asr_per_trigger"].get(t, math.nan) for t in triggers] + [ev["aasr"], ev["masr"]]
        xs = [g + (i - (len(evals) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=f"{name} (ACC {ev['acc']:.1f})")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(evals), loc="lower center", bbox_to_anchor=(0.5, 1.0))  # above: bars reach 100
    _save(fig, path)


def _run_rows(summary: dict, config: dict, norm_tags: list[str]) -> list[tuple[str, str]]:
    rows = [(k, summary[k]) for k in ("steps", "samples", "world_size", "zero_stage", "wall_time_s") if k in summary]
    rows += [(k, f"{v:.4g}") for k, v in summary.items() if k.startswith("final_") and isinstance(v, (int, float))]
    model, reg = config.get("model", {}), config.get("regularizer", {})
    if "family" in model:
        rows.append(("model", f"{model['family']} {model.get('path') or '(tiny synthetic)'}"))
    if "lam" in reg:
        rows += [("λ", reg["lam"]), ("L_PT weight", reg.get("pt_weight", 1.0))]
    if "regularized" in model:
        rows.append(("regularized patterns", ", ".join(f"`{p}`" for p in model["regularized"]) or "family default"))
    if norm_tags:
        rows.append(("regularized weights", len(norm_tags)))
    return [(k, str(v)) for k, v in rows]


def write_report(run_dir: Path, evals: dict[str, dict] | None = None, title: str | None = None,
                 notes: list[str] | None = None, report_path: Path | None = None) -> Path:
    """Write run_dir/report.md and its plots under run_dir/report/; return the report.md path.

    `evals` maps a name ("backdoored", "purified") to an eval.json dict; ASR bars and tables
    are drawn only when it is given. `report_path` puts the markdown elsewhere (the demo's
    top-level report.md); its image links then point into run_dir/report/.
    """
    run_dir = Path(run_dir)
    out = Path(report_path) if report_path else run_dir / "report.md"
    link = Path(os.path.relpath(run_dir / "report", out.parent)).as_posix()
    evals = evals or {}
    _check_evals(evals)  # before anything is written
    tb = run_dir / "tb"
    scalars = read_scalars(tb) if tb.is_dir() else {}
    summary = _load(run_dir / "summary.json", json.loads)
    config = _load(run_dir / "config.yaml", yaml.safe_load)
    parts = _loss_parts(scalars)
    norm_tags = sorted(t for t in scalars if t.startswith("reg/norm/"))

    plot_dir = run_dir / "report"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in PLOTS:  # a rerun without evals must not leave the last run's asr.png behind
        (plot_dir / stale).unlink(missing_ok=True)

    md = [f"# {title or f'Run report: {run_dir.name}'}", ""]
    md += [f"- {n}" for n in notes or []] + ([""] if notes else [])
    rows = _run_rows(summary, config, norm_tags)
    if rows:
        md += ["| run | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    if not scalars:
        md += [f"Note: no TensorBoard scalars found in {tb}.", ""]
    if parts:
        _plot_losses(scalars, parts, plot_dir / "loss.png")
        md += ["## Loss", "", "![loss](report/loss.png)", ""]
    if norm_tags:
        _plot_norms(scalars, norm_tags, plot_dir / "norms.png")
        md += ["## Per-layer ‖W‖_F", "",
               "First and last logged values. `reg/norm/*` logged at step k is the norm in step k's forward, before that step's update: the first value is after `train.log_every` - 1 updates (the input's norm when `train.log_every=1`), the last is before the final update.", "",
               "| weight | first (step) | last (step) | last / first |", "| --- | ---: | ---: | ---: |"]
        for tag in norm_tags:
            steps, values = _series(scalars[tag])
            ratio = f"{values[-1] / values[0]:.4f}" if values[0] else "—"
            md.append(f"| {short_name(tag.removeprefix('reg/norm/'))} | {values[0]:.4f} ({steps[0]}) "
                      f"| {values[-1]:.4f} ({steps[-1]}) | {ratio} |")
        md += ["", "![norms](report/norms.png)", ""]
    if evals:
        # Union of triggers in first-seen order: two evaluations may not share every trigger.
        triggers = list(dict.fromkeys(t for ev in evals.values() for t in ev["asr_per_trigger"]))
        _plot_asr(evals, triggers, plot_dir / "asr.png")
        md += ["## Backdoor evaluation", "", "All values in percent (± is the sample std over seeds).", "",
               "| model | ACC | AASR | MASR |", "| --- | ---: | ---: | ---: |"]
        # An evaluation that marked itself INVALID (a degenerate classifier) says so in every table that shows it.
        md += [f"| {n}{' **(INVALID: ASR is not evidence)**' if ev.get('valid') is False else ''} | {_pm(ev, 'acc')} | "
               f"{_pm(ev, 'aasr')} | {_pm(ev, 'masr')} |" for n, ev in evals.items()]
        md += ["", "| trigger | " + " | ".join(f"ASR(t) {n}" for n in evals) + " |",
               "| --- | " + " | ".join("---:" for _ in evals) + " |"]
        md += [f"| {t} | " + " | ".join(_pm(ev, "asr_per_trigger", t) for ev in evals.values()) + " |" for t in triggers]
        md += ["", "![asr](report/asr.png)", ""]

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md).replace("](report/", f"]({link}/"))
    return out
