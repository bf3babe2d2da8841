"""Provenance of a lab result: the machine, the commit, and what a run's TensorBoard files say."""

from __future__ import annotations

from pathlib import Path


def machine() -> str:
    """One line naming this machine: CPU model, cores, memory, accelerator."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - a machine description must never fail the bench
        gpu = "GPU unknown"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}"


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def norm_ratios(run_dir: Path) -> dict[str, float]:
    """Per regularized weight, ||W||_F last logged / first logged, from the run's TensorBoard files."""
    from ..metrics import read_scalars

    out = {}
    for tag, points in read_scalars(run_dir / "tb").items():
        if tag.startswith("reg/norm/") and points:
            pts = sorted(points)
            out[tag.removeprefix("reg/norm/")] = pts[-1][1] / pts[0][1] if pts[0][1] else float("nan")
    return out


def setting_text(config: dict) -> str:
    """A row's setting for a results table: its keys, then the range of its ||W|| ratios."""
    text = ", ".join(f"{k}={v}" for k, v in config.items() if k != "norm_ratio")
    if config.get("norm_ratio"):
        r = list(config["norm_ratio"].values())
        text += f", ‖W‖ last/first {min(r):.2f}-{max(r):.2f}"
    return text
