"""Resuming: which checkpoint, whether it fits this run, and loading it on any world size.

`plan` decides (on rank 0) how a checkpoint is read: as written, or through DeepSpeed's universal
format when the world size or ZeRO stage changed; `load` restores model, optimizer, scheduler
and RNG. See WORLD_SIZE_CHANGE for what a different world size guarantees.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .store import COMPLETE, PARTIAL, UNIVERSAL, CheckpointError, _write_durably, read_meta, set_rng_state, weights_only_loads


def check_data_state(saved: dict | None, now: dict, where: Path) -> None:
    """Refuse a resume whose data position would mean something else in this run.

    Steps, the learning-rate schedule and the position in the data are counted in global
    batches of one data set read in one seeded order, so train.seed, train.global_batch_size and
    the number of samples must match the checkpoint's. The world size and micro batch may change
    (gradient accumulation adjusts); see `WORLD_SIZE_CHANGE` for what then holds.
    """
    if not saved:
        return  # written by an older version: nothing to compare
    fixes = {"seed": "train.seed", "global_batch_size": "train.global_batch_size", "num_samples": "the number of samples in data.train_urls"}
    for key, name in fixes.items():
        if key in saved and saved[key] != now[key]:
            hint = f"; resume with --{name}={saved[key]}" if name.startswith("train.") else "; resume with the same shards, or start fresh"
            raise CheckpointError(
                f"resume: {name} is {now[key]} but {where} was written with {saved[key]}: the position in the data "
                f"and the learning-rate schedule would not continue{hint}"
            )


WORLD_SIZE_CHANGE = """\
Resuming on M ranks a checkpoint saved by N ranks, with the same train.global_batch_size:
- the model, optimizer and learning-rate schedule continue from the checkpoint (ZeRO-0 loads as
  written; ZeRO 1-3 goes through DeepSpeed's universal checkpoint), and so do the step, epoch
  and sample counters: the run has the same length, the same learning rate at every step and
  the same number of samples per step as an uninterrupted run;
- a checkpoint at an epoch boundary (step a multiple of the steps per epoch) continues with
  exact data coverage: every later epoch reads each sample once, in the order an M-rank run
  gives that epoch (a pure function of seed, epoch and M);
- mid-epoch, the rest of the interrupted epoch is exactly what the N-rank run would have read:
  each remaining step's global batch is the N-rank run's step (data/train_data.py replays the old
  ranks' reader streams, recorded by the world size, micro batch and worker count in the data
  state; each new rank reads only the old streams its share overlaps). Over the epoch every
  sample is read once, none twice; later epochs use the M-rank split. Exceptions: with
  data.resampled, or a checkpoint without the worker count, the rest of the epoch is read with the
  M-rank split (some samples may repeat and as many be left out within that epoch);
- per-rank random streams (dropout, DataLoader worker seeds follow the data position) have no
  counterpart on another world size: each rank reseeds torch from (seed, rank, step). The
  result is deterministic for a given checkpoint and M, but it is not bit-identical to an
  uninterrupted run on N or on M ranks.
A different train.global_batch_size, train.seed or sample count is refused (check_data_state).
"""


@dataclass
class ResumePlan:
    """What a resume loads: where from, whether through DeepSpeed's universal format."""

    root: Path  # the checkpoints directory holding `tag`
    tag: str
    meta: dict  # COMPLETE of the checkpoint
    load_root: Path  # where DeepSpeed reads: `root`, or the universal copy's directory
    universal: bool
    same_world: bool


ZERO0 = "zero0"  # own_root/zero0/<tag>: a ZeRO 1-3 checkpoint rewritten in ZeRO-0's layout
CONVERSION = 2  # bumped when a converted folder's layout changes: older conversions are made again


def plan(root: Path, tag: str, own_root: Path, world_size: int, zero_stage: int,
         trainable: list[str] | None = None, template: dict | None = None) -> ResumePlan:
    """Decide how to load checkpoint `root/tag` on `world_size` ranks under `zero_stage`; rank 0 only.

    The same stage (and, for ZeRO 1-3, the same world size): DeepSpeed loads its files as written;
    ZeRO-0 keeps whole optimizer state in one file, so any world size loads it directly too.
    Otherwise the checkpoint is converted once (written aside, then renamed; reused while its
    source is the same): to DeepSpeed's universal format for a ZeRO 1-3 engine (`ds_to_universal`
    or, from ZeRO-0, stages.zero0_to_universal; completed for every 1-3 loader by
    stages.complete_universal), or to ZeRO-0's own layout for a ZeRO-0 engine
    (stages.universal_to_zero0). `trainable` (names of the optimized parameters, in the
    optimizer's order) and `template` (the built module's state dict) are needed for the
    conversions to and from ZeRO-0.
    """
    from . import stages

    meta = read_meta(root / tag)
    if meta is None:
        raise CheckpointError(f"resume: {root / tag} is not a complete checkpoint")
    saved_world = meta.get("world_size", world_size)
    saved_stage = meta.get("zero_stage", zero_stage)
    same = saved_world == world_size
    if saved_stage == zero_stage and (zero_stage == 0 or same):
        return ResumePlan(root, tag, meta, root, universal=False, same_world=same)
    if (saved_stage == 0 or zero_stage == 0) and (trainable is None or template is None):
        raise CheckpointError(f"resume: moving {root / tag} from ZeRO-{saved_stage} to ZeRO-{zero_stage} needs the model's parameter list")
    source = {"source": str((root / tag).resolve()), "conversion": CONVERSION}
    uni_root = own_root / UNIVERSAL
    universal = uni_root / tag

    def converted(target: Path, build) -> None:
        """`build(partial)` once per source: written as target.partial, renamed, COMPLETE last."""
        if read_meta(target) == source:
            return
        partial = target.with_name(target.name + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            with weights_only_loads():
                build(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.rename(partial, target)
        _write_durably(target / COMPLETE, json.dumps(source))

    def to_uni(partial: Path) -> None:
        if saved_stage == 0:
            stages.zero0_to_universal(root / tag, partial, trainable)
        else:
            to_universal(root / tag, partial)
            stages.complete_universal(partial)

    converted(universal, to_uni)
    if zero_stage != 0:
        return ResumePlan(root, tag, meta, uni_root, universal=True, same_world=same)
    z0_root = own_root / ZERO0
    converted(z0_root / tag, lambda partial: stages.universal_to_zero0(universal, partial, trainable, template))
    return ResumePlan(root, tag, meta, z0_root, universal=False, same_world=same)


def to_universal(src: Path, partial: Path) -> None:
    """DeepSpeed's ds_to_universal from checkpoint `src` into `partial` (the caller renames it)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = SimpleNamespace(
        input_folder=str(src), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # Our engines carry no universal-checkpoint info of their own (no tensor parallelism).
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(args)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
        raise CheckpointError(f"resume: converting {src} to DeepSpeed's universal format failed: {type(e).__name__}: {e} ({tail})") from e
    (partial.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's own pointer; unused


def load(engine, resume: ResumePlan, rank: int, reseed: int) -> dict:
    """Load model, optimizer and scheduler; restore this rank's RNG. Returns the client state.

    With the world size the checkpoint was saved with, rank r restores rank r's RNG states
    exactly. On another world size the per-rank streams have no counterpart, so every rank
    seeds torch from `reseed` (a value the caller derives from seed, rank and step).
    """
    with weights_only_loads():
        path, client_state = engine.load_checkpoint(
            str(resume.load_root), tag=resume.tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise CheckpointError(f"could not load checkpoint {resume.load_root / resume.tag}")
    rng_file = resume.root / resume.tag / f"rng_rank{rank}.pt"
    if resume.same_world and rng_file.is_file():
        with weights_only_loads():
            set_rng_state(torch.load(rng_file))
    else:
        torch.manual_seed(reseed)
    return client_state or {}
