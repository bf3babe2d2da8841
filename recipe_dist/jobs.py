"""Jobs: what the Trainer runs. A job is a model family plus an objective.

`purify` (a defense), `attack` (POR, NeuBA, BadPre) and `fit-head` are all jobs for the same
Trainer, so DeepSpeed, shards, checkpoints, resume, TensorBoard and export apply to each alike.
The CLI (`cli.build_job`) is the one place a command becomes a job; nothing here imports a
concrete job, so the attacks, defenses and head fitting can all build on `FamilyJob`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from torch import nn

from .models import LoadedModel, ModelFamily


@runtime_checkable
class Job(Protocol):
    """The Trainer's view of a job.

    `build_task` returns the module DeepSpeed wraps; its forward(**batch) returns
    {"loss": 0-dim tensor, "parts": {name: detached 0-dim}, "norms": {weight: detached 0-dim}}:
    every part is logged as train/<name>, every norm as reg/norm/<weight>.
    """

    name: str  # the command, shown in progress bars and reports
    family: ModelFamily

    def load(self, path: Path, cfg) -> LoadedModel: ...
    def build_task(self, loaded: LoadedModel, cfg) -> nn.Module: ...
    def decode(self, cfg) -> Callable[[dict], dict]: ...
    def preprocess(self, processor, cfg) -> Callable[[dict], dict]: ...
    def collate(self, processor, cfg) -> Callable[[list, int], dict]: ...
    def export(self, loaded: LoadedModel, state: dict, out_dir: Path) -> list[Path]: ...


class FamilyJob:
    """A job that loads, preprocesses and exports exactly as its family does; subclasses give
    `build_task` (and may wrap `preprocess`/`collate`)."""

    name = "job"

    def __init__(self, family: ModelFamily):
        self.family = family

    def load(self, path: Path, cfg) -> LoadedModel:
        return self.family.load(path, cfg)

    def build_task(self, loaded: LoadedModel, cfg) -> nn.Module:
        raise NotImplementedError

    def decode(self, cfg):
        return self.family.decode(cfg)

    def preprocess(self, processor, cfg):
        return self.family.preprocess(processor, cfg)

    def collate(self, processor, cfg):
        return self.family.collate(processor, cfg)

    #: keep a masked-LM head the input did not have (fit-head's whole point); other jobs drop it,
    #: so their output has the input's tensors and naming and replaces it as it stands
    keep_head = False

    def export(self, loaded: LoadedModel, state: dict, out_dir: Path) -> list[Path]:
        from .models.base import carry_input_files

        extra = {"keep_head": True} if self.keep_head else {}
        files = self.family.export(loaded, state, out_dir, **extra)
        carry_input_files(loaded.path, out_dir, replace=getattr(self.family, "verbatim_files", lambda keep: ())(self.keep_head))
        return files
