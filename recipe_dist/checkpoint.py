"""DeepSpeed checkpoints that count only once complete, with keep-last-K and `--resume auto`.

Layout under `<output_dir>/checkpoints/`:
  step_00000100/          DeepSpeed's files for that step, plus rng_rank<r>.pt per rank
  step_00000100/COMPLETE  written by rank 0 after every rank has finished writing
  latest                  the newest complete tag, replaced atomically (os.replace)

DeepSpeed's own `latest` file is written by rank 0 before other ranks may have finished, so it
is not used; a tag without COMPLETE is ignored by resume and removed by pruning.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .distributed import barrier
from .errors import RecipeError

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


class CheckpointError(RecipeError, RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), np_state[2], np_state[3], np_state[4]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_tags(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of complete checkpoints, newest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if m and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d.name))
    return sorted(found, reverse=True)


def find_resume(root: Path) -> str | None:
    """The newest complete checkpoint tag, scanning down past incomplete ones."""
    tags = complete_tags(root)
    return tags[0][1] if tags else None


def save(engine, root: Path, step: int, client_state: dict, keep: int, rank: int) -> str:
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if rank == 0:
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "time": time.time()}))
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        prune(root, keep)
    barrier()
    return tag


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and stale partial ones."""
    if keep < 2:
        raise CheckpointError("checkpoint.keep must be >= 2")
    complete = complete_tags(root)
    if not complete:
        return
    survivors = {tag for _, tag in complete[:keep]}
    newest = complete[0][0]
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if not m or d.name in survivors:
            continue
        is_complete = (d / COMPLETE).is_file()
        # A partial directory newer than the newest complete one may still be being written.
        if is_complete or int(m.group(1)) < newest:
            shutil.rmtree(d, ignore_errors=True)


def load(engine, root: Path, tag: str, rank: int) -> dict:
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        # Our own file, written by this program: full unpickling is acceptable here.
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
