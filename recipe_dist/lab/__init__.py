"""`recipe-dist bench ...`: measurements that print figures (never asserted timings)."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: str | None, result: dict, render) -> None:
    """`--json FILE` for a bench with a table: the result as FILE and its rendered markdown as FILE.md."""
    if path:
        write_json(path, result)
        Path(path).with_suffix(".md").write_text(render(result))


def write_json(path: str | None, figures: dict) -> None:
    """The `--json FILE` output every bench shares: the printed figures, machine-readable."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")
