"""The purification loop: RECIPE continual pre-training on a DeepSpeed engine."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_scheduler

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, deepspeed_config, dump_yaml, to_dict
from .data import synthetic
from .data import storage
from .data.pipeline import (WaitTimer, check_shard_count, check_shards_exist, count_samples, epoch_stream, mix_seed,
                            rank_micro_batches, shard_urls, timed)
from .data.shards import write_shards
from .distributed import barrier, init_distributed, run_on_main
from .errors import RecipeError
from .metrics import build_logger
from .models import get_family
from .models.base import sha256_files
from .models.mlm import build_tiny_bert
from .report import write_report
from .preempt import Preemption, requeue
from .rundir import RunDir, check_resume_config, record_history, write_progress


class KeyLog:
    """`data.record_keys`: the sample keys of every consumed micro-batch, one JSON line each
    ({"step": the step it counts toward, "epoch", "micro": its index in the epoch, "keys"}), in
    OUTPUT_DIR/keys/rank<r>.jsonl.

    Lines are flushed as written, so a killed run keeps what it consumed. On start, lines past
    the step the run starts from are dropped (rank 0 also trims the files of ranks beyond this
    world size): after any number of resumes the files list exactly the samples that the final
    model's steps were trained on, in order.
    """

    def __init__(self, folder: Path, rank: int, world_size: int, step: int):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{rank}.jsonl"
        beyond = [p for p in folder.glob("rank*.jsonl") if p.stem[4:].isdigit() and int(p.stem[4:]) >= world_size]
        for p in [path, *(beyond if rank == 0 else [])]:
            lines = p.read_text().splitlines(keepends=True) if p.exists() else []
            kept = [ln for ln in lines if ln.endswith("\n") and json.loads(ln)["step"] <= step]
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, p)
        self.file = open(path, "a", buffering=1)

    def write(self, step: int, epoch: int, micro: int, features: list) -> None:
        keys = [f["__key__"] for f in features]
        self.file.write(json.dumps({"step": step, "epoch": epoch, "micro": micro, "keys": keys}) + "\n")

    def close(self) -> None:
        self.file.close()


class Trainer:
    """Runs one job on the DeepSpeed engine.

    The job is a model family (purification) or an attack wrapping one; it provides load,
    build_task, encoder, collate and export. Its task module returns {"loss", "parts", "norms"}:
    every entry of "parts" is logged as train/<name>, every norm as reg/norm/<weight>.
    """

    def __init__(self, cfg: RunConfig, job=None, name: str = "purify"):
        self.cfg = cfg
        self.job = job
        self.name = name
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"

    # ------------------------------------------------------------------ setup
    def _model_dir(self) -> Path:
        if self.cfg.model.path:
            return Path(self.cfg.model.path)
        target = self.out / "input_model"
        if not (target / "config.json").is_file():
            run_on_main(build_tiny_bert, target, self.cfg.model.tiny, self.cfg.model.tiny.seed)
        return target

    def _shard_urls(self) -> list[str]:
        spec = self.cfg.data.train_urls
        if not spec:
            prefix = self.out / "data" / "synthetic"

            def make():
                texts = synthetic.corpus(self.cfg.data.synthetic_samples, seed=self.cfg.train.seed)
                n_shards = max(8, 2 * self.dist.world_size * max(1, self.cfg.data.num_workers))
                per = math.ceil(len(texts) / n_shards)
                return write_shards(({"text": t} for t in texts), str(prefix), per, key_prefix="synthetic-")

            urls = run_on_main(make)
            if self.dist.is_main:
                print(f"data: SYNTHETIC corpus of {self.cfg.data.synthetic_samples} sentences ({prefix}-*.tar); pass --data.train_urls for real data")
            return urls
        urls = run_on_main(shard_urls, spec)  # a prefix or glob is listed once, on rank 0
        run_on_main(check_shards_exist, urls)
        return urls

    def _consolidated_state(self, engine, model: torch.nn.Module) -> dict | None:
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

    # ------------------------------------------------------------------ resume
    def _data_state(self, step: int, samples: int, steps_per_epoch: int, n_samples: int) -> dict:
        """Where the data stands after `step` (saved with every checkpoint): a resume continues at
        epoch `epoch`, skipping the `samples_in_epoch` samples it has seen of it."""
        t = self.cfg.train
        epoch, done = divmod(step, steps_per_epoch)
        return {
            "epoch": epoch, "samples": samples, "samples_in_epoch": done * t.global_batch_size, "seed": t.seed,
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "world_size": self.dist.world_size, "steps_per_epoch": steps_per_epoch, "num_samples": n_samples,
        }

    def _resume_plan(self, n_samples: int, steps_per_epoch: int) -> ckpt.ResumePlan | None:
        """The checkpoint `resume` names, checked against this run and converted to DeepSpeed's
        universal format if the world size changed; decided on rank 0 for every rank."""
        cfg = self.cfg
        if not cfg.resume:
            return None

        def decide():
            found = ckpt.resolve(cfg.resume, self.ckpt_root, self.run_id)
            if found is None:
                (self.out / "config.yaml").write_text(dump_yaml(cfg))
                return None
            root, tag = found
            meta = ckpt.read_meta(root / tag) or {}
            now = self._data_state(0, 0, steps_per_epoch, n_samples)
            ckpt.check_data_state(meta.get("data"), now, root / tag)
            changes = check_resume_config(meta.get("config"), to_dict(cfg), root / tag)
            record_history(self.out, meta.get("step", 0), changes)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
            return ckpt.plan(root, tag, self.ckpt_root, self.dist.world_size, cfg.train.zero_stage)

        plan = run_on_main(decide)
        if plan is None and self.dist.is_main:
            print(f"resume=auto: no complete checkpoint in {self.ckpt_root}; starting fresh")
        return plan

    def _restore(self, engine, plan: ckpt.ResumePlan, steps_per_epoch: int) -> tuple[int, int]:
        """Load `plan` into the engine; returns (step, samples) to continue from."""
        info = self.dist
        reseed = mix_seed(self.cfg.train.seed, 5, info.rank, plan.meta.get("step", 0))
        state = ckpt.load(engine, plan, info.rank, reseed)
        step, samples = state["step"], state["samples"]
        if info.is_main:
            print(f"resumed from {plan.root / plan.tag} at step {step}")
            saved = plan.meta.get("world_size")
            if not plan.same_world:
                where = "at an epoch boundary" if step % steps_per_epoch == 0 else (
                    f"mid-epoch: the rest of epoch {step // steps_per_epoch} is read with the {info.world_size}-rank shard split, "
                    "so some samples of it may repeat and as many be left out (later epochs are exact)")
                print(f"resume: checkpoint written by {saved} rank(s), continuing on {info.world_size} "
                      f"({'universal checkpoint' if plan.universal else 'ZeRO-0, loaded as written'}) {where}")
        return step, samples

    # ------------------------------------------------------------------ guards
    def _check_precision(self) -> None:
        """Refuse a precision the accelerator cannot run, before DeepSpeed starts."""
        from deepspeed.accelerator import get_accelerator

        p = self.cfg.train.precision
        acc = get_accelerator()
        if (p == "fp16" and not acc.is_fp16_supported()) or (p == "bf16" and not acc.is_bf16_supported()):
            raise ConfigError(f"train.precision: {p!r} is not supported on this machine's accelerator ({acc.device_name()}); use fp32")

    def _stop_if_nonfinite(self, step: int, since: int, names: list[str], sums: torch.Tensor, bad_grad: torch.Tensor, params: list) -> None:
        """Raise (on every rank) when a loss term since the last log, a gradient norm or a trainable
        weight is not finite; names the term, the steps and the last good checkpoint."""
        def local_bad(p: torch.nn.Parameter) -> torch.Tensor:
            t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition; p.data is a placeholder
            t = p.detach() if t is None else t
            return (~torch.isfinite(t)).any().float()

        weights_bad = torch.stack([local_bad(p) for p in params]).sum() if params else torch.zeros((), device=sums.device)
        flags = torch.cat([(~torch.isfinite(sums)).float(), bad_grad.reshape(1), weights_bad.reshape(1).to(sums.device)])
        if dist.is_initialized():
            dist.all_reduce(flags)
        flags = flags.tolist()
        terms = [n for n, f in zip(names, flags) if f and n != "loss"] or (["loss"] if flags[0] else [])
        if flags[-2]:
            terms.append("gradient norm")
        if flags[-1]:
            terms.append("weights")
        if not terms:
            return
        last = ckpt.find_resume(self.ckpt_root, self.run_id)
        where = f"the last good checkpoint is {self.ckpt_root / last}" if last else "no checkpoint was saved"
        raise RecipeError(f"training diverged: non-finite {', '.join(terms)} between steps {since + 1} and {step}; "
                          f"{where}; nothing was exported (lower optim.lr or check regularizer.lam)")

    # ------------------------------------------------------------------ run
    def train(self) -> dict:
        cfg = self.cfg
        # First of all: a scheduler's warning that arrives while the model loads must not kill
        # the process (SIGUSR1's default action); the flag is acted on at the first step boundary.
        self.preemption = Preemption(cfg.preempt.signals)
        self.dist = init_distributed()
        t_start = time.time()
        # Rank 0 locks output_dir for the run's life and refuses another run's directory (rundir.py).
        self.run_dir = RunDir(self.out)
        self.run_id = run_on_main(self.run_dir.claim, fresh=not cfg.resume, overwrite=cfg.overwrite)
        try:
            return self._train(t_start)
        finally:
            self.run_dir.release()
            self.preemption.restore()

    def _train(self, t_start: float) -> dict:
        cfg, info = self.cfg, self.dist
        if info.is_main and not cfg.resume:
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
        self._check_precision()
        torch.manual_seed(mix_seed(cfg.train.seed, 5, info.rank))

        job = self.job or get_family(cfg.model.family)
        self.model_dir = self._model_dir()
        loaded = job.load(self.model_dir, cfg)
        task = job.build_task(loaded, cfg)
        storage_options = storage.StorageOptions.from_config(cfg.data)
        storage.configure(storage_options)
        self.urls = urls = self._shard_urls()
        check_shard_count(len(urls), info.world_size, cfg.data.num_workers, cfg.data.resampled)
        n_samples = run_on_main(count_samples, urls, cfg.data.on_corrupt)

        ds_config = deepspeed_config(cfg, info.world_size)
        gas = ds_config["gradient_accumulation_steps"]
        steps_per_epoch = n_samples // cfg.train.global_batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} exceeds the {n_samples} samples in data.train_urls")
        total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))

        resume = self._resume_plan(n_samples, steps_per_epoch)
        if resume is not None and resume.universal:
            # Set before the engine is built: DeepSpeed reads it at init and at load.
            ds_config["checkpoint"] = {"load_universal": True}

        params = [p for p in task.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(
            model=task,
            model_parameters=params,
            config=ds_config,
            lr_scheduler=lambda opt: get_scheduler(
                cfg.optim.schedule if cfg.optim.schedule == "linear" else "constant_with_warmup",
                opt,
                num_warmup_steps=cfg.optim.warmup_steps,
                num_training_steps=total_steps,
            ),
        )

        # Training mode on every module the engine wraps: `from_pretrained` returns models in eval
        # mode (dropout off), and a job's task may keep frozen parts in eval through its own train().
        engine.train()
        step = samples = 0
        if resume is not None:
            step, samples = self._restore(engine, resume, steps_per_epoch)

        logger = build_logger(info.is_main, self.out / "tb", purge_step=step or None)
        encode = job.encoder(loaded.tokenizer, cfg)
        collate = job.collate(loaded.tokenizer, cfg)
        quota = steps_per_epoch * gas  # micro-batches per rank per epoch, equal on every rank

        def make_stream(epoch: int):
            return epoch_stream(urls, epoch, cfg.train.seed, cfg.data.text_key, encode, cfg.train.micro_batch_size, cfg.data.shuffle_buffer,
                                on_corrupt=cfg.data.on_corrupt, resampled=cfg.data.resampled, options=storage_options)

        data_timer = WaitTimer()
        keys_log = KeyLog(self.out / "keys", info.rank, info.world_size, step) if cfg.data.record_keys else None

        preempted = False
        bar = tqdm(total=total_steps, initial=step, disable=not info.is_main, desc=self.name, unit="step", dynamic_ncols=True)
        # Loss and its parts summed on the device since the last log: no host sync per micro-batch.
        part_names = None
        sums = None
        n_micro = 0
        last = None
        t_log, step_log = time.time(), step
        stop_at = cfg.train.stop_at_step
        while step < total_steps and not (stop_at and step >= stop_at) and not preempted:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            micro = done_in_epoch * gas
            for features in timed(rank_micro_batches(make_stream, epoch, quota, cfg.data.num_workers, skip=micro, seed=cfg.train.seed), data_timer):
                if keys_log:
                    keys_log.write(step + 1, epoch, micro, features)
                batch = collate(features, mix_seed(cfg.train.seed, 2, epoch, micro, info.rank))
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                out = engine(**batch)
                engine.backward(out["loss"])
                engine.step()
                if part_names is None:
                    part_names = ["loss", *out["parts"]]
                    sums = torch.zeros(len(part_names), device=engine.device)
                    bad_grad = torch.zeros((), device=engine.device)
                sums += torch.stack([out["loss"].detach().float(), *(out["parts"][k].float() for k in part_names[1:])])
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:  # a device value: accumulated, not synced, until the next check
                    bad_grad += (~torch.isfinite(torch.as_tensor(grad_norm, device=engine.device).float())).float()
                n_micro += 1
                micro += 1
                if micro % gas:
                    continue
                step += 1
                samples += cfg.train.global_batch_size
                bar.update(1)
                at_stop = bool(stop_at) and step >= stop_at
                # Every rank stops after the same step when any was signalled (preempt.py).
                preempted = self.preemption.agreed(engine.device)
                save_now = step % cfg.checkpoint.every_steps == 0 or step == total_steps or at_stop or preempted
                if save_now or step % cfg.train.log_every == 0:
                    # A host sync, at log and checkpoint steps only: a non-finite loss, gradient norm
                    # or weight stops the run before it is logged as progress or saved.
                    self._stop_if_nonfinite(step, step_log, part_names, sums, bad_grad, params)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    now = time.time()
                    # One small all-reduce at log steps only, summing over ranks the loss parts (the
                    # logged loss is their mean) and the data health: storage retries and skipped
                    # shards so far, and the seconds blocked on the loader since the last log.
                    data = torch.tensor([*storage.counts().values(), data_timer.take()], device=engine.device)
                    stats = torch.cat([sums / n_micro, data])
                    if dist.is_initialized():
                        dist.all_reduce(stats)
                    stats = stats.tolist()  # with the norms below, the host syncs of a logging step
                    last = {k: v / info.world_size for k, v in zip(part_names, stats)}
                    retries, skipped, wait = stats[len(part_names):]
                    norms = dict(zip(out["norms"], torch.stack(list(out["norms"].values())).tolist())) if out["norms"] else {}
                    logger.scalars(
                        {
                            **{f"train/{k}": v for k, v in last.items()},
                            "train/lr": engine.get_lr()[0],
                            "train/samples_per_second": (step - step_log) * cfg.train.global_batch_size / max(now - t_log, 1e-9),
                            "train/data_wait_fraction": wait / info.world_size / max(now - t_log, 1e-9),
                            "data/retries": retries,
                            "data/corrupt_skipped": skipped,
                            **{f"reg/norm/{k}": v for k, v in norms.items()},
                        },
                        step,
                    )
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
                    if info.is_main:  # for `recipe-dist slurm status`: where the run stands, and how fast
                        write_progress(self.out, step, total_steps, (step - step_log) / max(now - t_log, 1e-9))
                    sums.zero_()
                    n_micro = 0
                    t_log, step_log = now, step
                if save_now:
                    data_state = self._data_state(step, samples, steps_per_epoch, n_samples)
                    client = {"step": step, "samples": samples, "data": data_state, "config": to_dict(cfg)}
                    meta = {"world_size": info.world_size, "zero_stage": cfg.train.zero_stage, "data": data_state,
                            "run_id": self.run_id, "config": to_dict(cfg)}
                    ckpt.save(engine, self.ckpt_root, step, client, cfg.checkpoint.keep, info.rank, meta)
                if step >= total_steps or at_stop or preempted:
                    break
        bar.close()
        logger.close()
        if keys_log:
            keys_log.close()

        if preempted and step < total_steps:
            # Rank 0 decides and requeues; a refusal (too many requeues) is raised on every rank.
            what = run_on_main(requeue, cfg.preempt.requeue, cfg.preempt.max_requeues)
            if info.is_main:
                print(f"{self.preemption.signal_name.removeprefix('SIG')} received: saved step {step}/{total_steps}; {what}", flush=True)
            return {"steps": step, "stopped": True, "preempted": True}

        if stop_at and step < total_steps:
            if info.is_main:
                print(f"stopped at step {step}/{total_steps} (train.stop_at_step); continue with --resume auto")
            return {"steps": step, "stopped": True}

        state = self._consolidated_state(engine, loaded.model)
        summary = {"steps": step, "total_steps": total_steps}
        if info.is_main:
            bad = [k for k, v in state.items() if v is not None and v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise RecipeError(f"export refused: {len(bad)} tensor(s) hold non-finite values (first: {bad[0]}); nothing was written to {self.out / 'model'}")
            out_files = job.export(loaded, state, self.out / "model")
            summary = {
                "steps": step,
                "samples": samples,
                "wall_time_s": round(time.time() - t_start, 3),
                "world_size": info.world_size,
                "zero_stage": cfg.train.zero_stage,
                **{f"final_{k}": v for k, v in (last or {}).items()},
                "input_weights_sha256": sha256_files(loaded.weight_files),
                "output_weights_sha256": sha256_files(out_files),
            }
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            # The logger was closed (flushed) above: the report reads the curves back from tb/.
            write_report(self.out, title=f"recipe-dist {self.name}: {self.out.name}")
            print(f"{self.name}: wrote {self.out / 'model'} and {self.out / 'report.md'}")
        barrier()
        return summary
