"""Checkpoints: storing (store.py), resuming (resume.py) and the trainer's Checkpointer (manager.py).

Layout under `<output_dir>/checkpoints/`: see store.py. The names below are the package's API.
"""

from .resume import WORLD_SIZE_CHANGE, ResumePlan, check_data_state, load, plan, to_universal
from .store import (COMPLETE, GARBAGE_RE, PARTIAL, TAG_RE, UNIVERSAL, CheckpointError, _describe, complete_tags,
                    file_digests, find_resume, prune, read_meta, resolve, rng_state, save, set_rng_state, tag_for, verified_tags,
                    verify, weights_only_loads)

__all__ = [
    "WORLD_SIZE_CHANGE", "ResumePlan", "check_data_state", "load", "plan", "to_universal", "COMPLETE", "GARBAGE_RE",
    "PARTIAL", "TAG_RE", "UNIVERSAL", "CheckpointError", "_describe", "complete_tags", "find_resume", "prune",
    "file_digests", "read_meta", "resolve", "verified_tags", "verify", "rng_state", "save", "set_rng_state", "tag_for", "weights_only_loads", "Checkpointer",
]


def __getattr__(name):
    # The Checkpointer imports deepspeed and the config; loaded on first use so that reading
    # checkpoint metadata (slurm status, tests) stays light.
    if name == "Checkpointer":
        from .manager import Checkpointer

        return Checkpointer
    raise AttributeError(name)
