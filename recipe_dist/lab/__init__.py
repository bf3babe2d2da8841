"""`recipe-dist bench ...`: measurements that print figures (never asserted timings)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, figures: dict) -> None:
    """The `--json FILE` output every bench shares: the printed figures, machine-readable."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")
