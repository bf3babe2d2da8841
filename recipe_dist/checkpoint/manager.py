"""The Checkpointer: the one component the training loop asks about saving and resuming.

Modelled on torchtitan's CheckpointManager. It saves the engine and the training data (a stateful
part that knows its own position), decides which checkpoint a resume reads and whether it fits this run (`plan_resume`), loading it (`restore`),
the save cadence (`maybe_save`) and the consolidated weights for export (`consolidated_state`).
The loop only tells it the step it reached.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

from ..config import to_dict
from ..distributed import run_on_main
from ..rundir import check_resume_config, record_history, write_run_config
from ..seeds import Stream, mix_seed
from . import resume as resuming
from . import store


class Checkpointer:
    """Saves and restores the engine (model, optimizer, scheduler) and `data`, the training data:
    a stateful part with `state_dict(step, samples)` / `load_state_dict(saved)` that knows its
    own position, as torchtitan's checkpointer holds its dataloader."""

    def __init__(self, cfg, out: Path, dist, run_id: str, data):
        self.cfg, self.out, self.dist, self.run_id, self.data = cfg, out, dist, run_id, data
        self.root = out / "checkpoints"

    def last_good(self) -> Path | None:
        good = store.verified_tags(self.root, self.run_id, warn=lambda _: None, first_only=True)
        return self.root / good[0][1] if good else None

    # ------------------------------------------------------------------ resume
    def plan_resume(self, task=None) -> resuming.ResumePlan | None:
        """The checkpoint `resume` names, checked against this run and converted when the world
        size or ZeRO stage changed (resume.plan); decided on rank 0 for every rank. `task` is the
        module the engine will wrap: its trainable parameters, in the optimizer's order, and its
        state dict are what a conversion to or from ZeRO-0 needs."""
        cfg = self.cfg
        trainable = [n for n, p in task.named_parameters() if p.requires_grad] if task is not None else None
        if not cfg.resume:
            return None

        def decide():
            found = store.resolve(cfg.resume, self.root, self.run_id)
            if found is None:
                write_run_config(self.out, cfg)
                return None
            root, tag = found
            meta = store.read_meta(root / tag) or {}
            resuming.check_data_state(meta.get("data"), self.data.state_dict(0, 0), root / tag)
            changes = check_resume_config(meta.get("config"), to_dict(cfg), root / tag)
            record_history(self.out, meta.get("step", 0), changes)
            write_run_config(self.out, cfg)
            template = task.state_dict() if task is not None and (meta.get("zero_stage") == 0) != (cfg.train.zero_stage == 0) else None
            return resuming.plan(root, tag, self.root, self.dist.world_size, cfg.train.zero_stage, trainable, template)

        plan = run_on_main(decide)
        if plan is None and self.dist.is_main:
            print(f"resume=auto: no complete checkpoint in {self.root}; starting fresh")
        return plan

    def restore(self, engine, plan: resuming.ResumePlan | None) -> tuple[int, int]:
        """Load `plan` into the engine and the data; returns (step, samples) to continue from ((0, 0) without one)."""
        if plan is None:
            return 0, 0
        info = self.dist
        exact_epoch = self.data.load_state_dict(plan.meta.get("data"))
        steps_per_epoch = self.data.steps_per_epoch
        reseed = mix_seed(self.cfg.train.seed, Stream.TORCH_GLOBAL, info.rank, plan.meta.get("step", 0))
        state = resuming.load(engine, plan, info.rank, reseed)
        step, samples = state["step"], state["samples"]
        if info.is_main:
            print(f"resumed from {plan.root / plan.tag} at step {step}")
            if not plan.same_world:
                where = "at an epoch boundary" if step % steps_per_epoch == 0 else (
                    f"mid-epoch: the rest of epoch {step // steps_per_epoch} is exactly what the "
                    f"{plan.meta.get('world_size')}-rank run would have read, step by step" if exact_epoch else
                    f"mid-epoch: the rest of epoch {step // steps_per_epoch} is read with the {info.world_size}-rank shard split, "
                    "so some samples of it may repeat and as many be left out (later epochs are exact)")
                print(f"resume: checkpoint written by {plan.meta.get('world_size')} rank(s), continuing on {info.world_size} "
                      f"({'universal checkpoint' if plan.universal else 'ZeRO-0, loaded as written'}) {where}")
        return step, samples

    # ------------------------------------------------------------------ save
    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.checkpoint.every_steps == 0 or step == total_steps

    def save(self, engine, step: int, samples: int) -> None:
        """A complete checkpoint of `step` (atomic: store.save), with the data position and config."""
        cfg, info = self.cfg, self.dist
        data_state = self.data.state_dict(step, samples)
        client = {"step": step, "samples": samples, "data": data_state, "config": to_dict(cfg)}
        meta = {"world_size": info.world_size, "zero_stage": cfg.train.zero_stage, "data": data_state,
                "run_id": self.run_id, "config": to_dict(cfg)}
        store.save(engine, self.root, step, client, cfg.checkpoint.keep, info.rank, meta)

    # ------------------------------------------------------------------ export
    def consolidated_state(self, engine, model: torch.nn.Module) -> dict | None:
        """Full tensors of `model` on rank 0 (None elsewhere), from any ZeRO stage."""
        stage3 = engine.zero_optimization_stage() == 3
        half = self.cfg.train.precision != "fp32"
        cache: dict[int, torch.Tensor] = {}
        state = {}
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) not in cache:
                value = None
                if half and isinstance(t, torch.nn.Parameter) and t.requires_grad:
                    # Half-precision runs keep fp32 masters in the optimizer: export those.
                    value = deepspeed.utils.safe_get_full_fp32_param(t)
                if value is None and stage3 and hasattr(t, "ds_id"):
                    # ZeRO-3: gather one tensor at a time so no rank ever holds the whole model.
                    with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                        value = t.data.detach().cpu().clone() if self.dist.is_main else None
                elif value is None:
                    value = t.detach().cpu().clone()
                cache[id(t)] = value.detach().cpu() if value is not None else None
            state[name] = cache[id(t)]  # tied entries share a tensor; export separates them
        return state if self.dist.is_main else None
