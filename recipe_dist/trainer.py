"""The purification loop: RECIPE continual pre-training on a DeepSpeed engine."""

from __future__ import annotations

import json
import math
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
from .distributed import DistInfo, barrier, init_distributed, run_on_main
from .metrics import build_logger
from .models import get_family
from .models.base import sha256_files
from .models.mlm import build_tiny_bert
from .report import write_report


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

    # ------------------------------------------------------------------ run
    def train(self) -> dict:
        cfg = self.cfg
        self.dist = info = init_distributed()
        t_start = time.time()
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
        barrier()
        torch.manual_seed(mix_seed(cfg.train.seed, 5, info.rank))

        job = self.job or get_family(cfg.model.family)
        loaded = job.load(self._model_dir(), cfg)
        task = job.build_task(loaded, cfg)
        storage_options = storage.StorageOptions.from_config(cfg.data)
        storage.configure(storage_options)
        urls = self._shard_urls()
        check_shard_count(len(urls), info.world_size, cfg.data.num_workers, cfg.data.resampled)
        n_samples = run_on_main(count_samples, urls, cfg.data.on_corrupt)

        ds_config = deepspeed_config(cfg, info.world_size)
        gas = ds_config["gradient_accumulation_steps"]
        steps_per_epoch = n_samples // cfg.train.global_batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} exceeds the {n_samples} samples in data.train_urls")
        total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))

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

        step = samples = 0
        if cfg.resume:
            tag = ckpt.find_resume(self.ckpt_root) if cfg.resume == "auto" else Path(cfg.resume).name
            root = self.ckpt_root if cfg.resume == "auto" else Path(cfg.resume).parent
            if tag is not None:
                state = ckpt.load(engine, root, tag, info.rank)
                step, samples = state["step"], state["samples"]
                if info.is_main:
                    print(f"resumed from {root / tag} at step {step}")
            elif info.is_main:
                print(f"resume=auto: no complete checkpoint in {self.ckpt_root}; starting fresh")

        logger = build_logger(info.is_main, self.out / "tb", purge_step=step or None)
        encode = job.encoder(loaded.tokenizer, cfg)
        collate = job.collate(loaded.tokenizer, cfg)
        quota = steps_per_epoch * gas  # micro-batches per rank per epoch, equal on every rank

        def make_stream(epoch: int):
            return epoch_stream(urls, epoch, cfg.train.seed, cfg.data.text_key, encode, cfg.train.micro_batch_size, cfg.data.shuffle_buffer,
                                on_corrupt=cfg.data.on_corrupt, resampled=cfg.data.resampled, options=storage_options)

        data_timer = WaitTimer()
        keys_log = None
        if cfg.data.record_keys:  # debug: which samples each micro-batch consumed (appended on resume)
            (self.out / "keys").mkdir(parents=True, exist_ok=True)
            keys_log = open(self.out / "keys" / f"rank{info.rank}.jsonl", "a", buffering=1)

        bar = tqdm(total=total_steps, initial=step, disable=not info.is_main, desc=self.name, unit="step", dynamic_ncols=True)
        # Loss and its parts summed on the device since the last log: no host sync per micro-batch.
        part_names = None
        sums = None
        n_micro = 0
        last = None
        t_log, step_log = time.time(), step
        stop_at = cfg.train.stop_at_step
        while step < total_steps and not (stop_at and step >= stop_at):
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            micro = done_in_epoch * gas
            for features in timed(rank_micro_batches(make_stream, epoch, quota, cfg.data.num_workers, skip=micro, seed=cfg.train.seed), data_timer):
                if keys_log:
                    keys_log.write(json.dumps({"step": step + 1, "epoch": epoch, "micro": micro, "keys": [f["__key__"] for f in features]}) + "\n")
                batch = collate(features, mix_seed(cfg.train.seed, 2, epoch, micro, info.rank))
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                out = engine(**batch)
                engine.backward(out["loss"])
                engine.step()
                if part_names is None:
                    part_names = ["loss", *out["parts"]]
                    sums = torch.zeros(len(part_names), device=engine.device)
                sums += torch.stack([out["loss"].detach().float(), *(out["parts"][k].float() for k in part_names[1:])])
                n_micro += 1
                micro += 1
                if micro % gas:
                    continue
                step += 1
                samples += cfg.train.global_batch_size
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    # One small all-reduce at log steps only: the logged loss is the mean over ranks.
                    mean = sums / n_micro
                    if dist.is_initialized():
                        dist.all_reduce(mean)
                        mean /= info.world_size
                    now = time.time()
                    # Data health summed over ranks: storage retries and skipped shards so far, and
                    # the seconds blocked on the loader since the last log (a share of wall time).
                    data = torch.tensor([*storage.counts().values(), data_timer.take()], device=engine.device)
                    if dist.is_initialized():
                        dist.all_reduce(data)
                    retries, skipped, wait = data.tolist()  # with the next line, the host syncs of a logging step
                    last = dict(zip(part_names, mean.tolist()))
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
                    sums.zero_()
                    n_micro = 0
                    t_log, step_log = now, step
                at_stop = bool(stop_at) and step >= stop_at
                if step % cfg.checkpoint.every_steps == 0 or step == total_steps or at_stop:
                    client = {"step": step, "samples": samples, "epoch": epoch, "micro_in_epoch": micro, "config": to_dict(cfg)}
                    ckpt.save(engine, self.ckpt_root, step, client, cfg.checkpoint.keep, info.rank)
                if step >= total_steps or at_stop:
                    break
        bar.close()
        logger.close()
        if keys_log:
            keys_log.close()

        if stop_at and step < total_steps:
            if info.is_main:
                print(f"stopped at step {step}/{total_steps} (train.stop_at_step); continue with --resume auto")
            return {"steps": step, "stopped": True}

        state = self._consolidated_state(engine, loaded.model)
        summary = {"steps": step, "total_steps": total_steps}
        if info.is_main:
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
