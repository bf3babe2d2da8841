"""The training loop: one job (a defense, an attack, head fitting) on a DeepSpeed engine.

`Trainer.train` reads top to bottom like nanoGPT's loop: batches -> task -> engine step ->
checkpoint and metrics. Everything it leans on is a component: the job (jobs.py) gives the
model, objective and preprocessing; `TrainData` the batches; the `Checkpointer` saving and
resuming; `StepMetrics` logging and the divergence check; `RunDir` the output directory's lock.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_scheduler

from .checkpoint.manager import Checkpointer
from .config import ConfigError, RunConfig, deepspeed_config, fit_batch_to_world, to_dict
from .data.train_data import KeyLog, TrainData
from .distributed import (DistInfo, a_peer_is_lost, barrier, clear_failure_notes, describe_world, diagnose, is_collective_failure, launcher_gone,
                          peers, process_group, report_own_failure, run_on_main, step_timeout)
from .errors import RecipeError
from .jobs import Job
from .metrics import build_logger
from .models.base import sha256_files
from .preempt import Preemption, requeue
from .rundir import RunDir, finished_summary, record_attempt, write_dir_aside, write_progress, write_run_config, write_summary
from .seeds import Stream, mix_seed


class StepMetrics:
    """Loss parts summed on the device between logs (no host sync per micro-batch), the logging
    step's one all-reduce, and the stop on anything non-finite. `out` is the run directory (its
    tb/ and progress file); `last_good` names the checkpoint a divergence error points to."""

    def __init__(self, engine, data: TrainData, params: list, step: int, total_steps: int, *, info: DistInfo, out: Path,
                 global_batch_size: int, last_good: Callable[[], Path | None]):
        self.engine, self.data, self.params, self.total_steps = engine, data, params, total_steps
        self.info, self.out, self.global_batch_size, self.last_good = info, out, global_batch_size, last_good
        self.logger = build_logger(info.is_main, out / "tb", purge_step=step or None)
        self.names: list[str] | None = None
        self.sums = self.bad_grad = None
        self.n_micro = 0
        self.last: dict | None = None
        self.t_log, self.step_log = time.time(), step

    def accumulate(self, out: dict) -> None:
        device = self.engine.device
        if self.names is None:
            self.names = ["loss", *out["parts"]]
            self.sums = torch.zeros(len(self.names), device=device)
            self.bad_grad = torch.zeros((), device=device)
        self.sums += torch.stack([out["loss"].detach().float(), *(out["parts"][k].float() for k in self.names[1:])])
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:  # a device value: accumulated, not synced, until the next check
            self.bad_grad += (~torch.isfinite(torch.as_tensor(grad_norm, device=device).float())).float()
        self.n_micro += 1
        self.norms = out["norms"]

    def check_finite(self, step: int) -> None:
        """Raise (on every rank) when a loss term since the last log, a gradient norm or a trainable
        weight is not finite; names the term, the steps and the last good checkpoint."""
        def local_bad(p: torch.nn.Parameter) -> torch.Tensor:
            t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition; p.data is a placeholder
            t = p.detach() if t is None else t
            return (~torch.isfinite(t)).any().float()

        weights_bad = torch.stack([local_bad(p) for p in self.params]).sum() if self.params else torch.zeros((), device=self.sums.device)
        flags = torch.cat([(~torch.isfinite(self.sums)).float(), self.bad_grad.reshape(1), weights_bad.reshape(1).to(self.sums.device)])
        if dist.is_initialized():
            dist.all_reduce(flags)
        flags = flags.tolist()
        terms = [n for n, f in zip(self.names, flags) if f and n != "loss"] or (["loss"] if flags[0] else [])
        terms += (["gradient norm"] if flags[-2] else []) + (["weights"] if flags[-1] else [])
        if not terms:
            return
        last = self.last_good()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        raise RecipeError(f"training diverged: non-finite {', '.join(terms)} between steps {self.step_log + 1} and {step}; "
                          f"{where}; nothing was exported (lower optim.lr or check regularizer.lam)")

    def log(self, step: int, bar: tqdm) -> None:
        """One small all-reduce: the loss parts (the logged loss is their mean over ranks) and the
        data health (storage retries, skipped shards, seconds blocked on the loader since the last log)."""
        info, now = self.info, time.time()
        stats = torch.cat([self.sums / self.n_micro, torch.tensor(self.data.stats(), device=self.engine.device)])
        if dist.is_initialized():
            dist.all_reduce(stats)
        stats = stats.tolist()  # with the norms below, the host syncs of a logging step
        self.last = {k: v / info.world_size for k, v in zip(self.names, stats)}
        retries, skipped, wait = stats[len(self.names):]
        norms = dict(zip(self.norms, torch.stack(list(self.norms.values())).tolist())) if self.norms else {}
        elapsed = max(now - self.t_log, 1e-9)
        self.logger.scalars({
            **{f"train/{k}": v for k, v in self.last.items()},
            "train/lr": self.engine.get_lr()[0],
            "train/samples_per_second": (step - self.step_log) * self.global_batch_size / elapsed,
            "train/data_wait_fraction": wait / info.world_size / elapsed,
            "data/retries": retries,
            "data/corrupt_skipped": skipped,
            **{f"reg/norm/{k}": v for k, v in norms.items()},
        }, step)
        bar.set_postfix({k: f"{v:.4g}" for k, v in self.last.items()})
        if info.is_main:  # for `recipe-dist slurm status`: where the run stands, and how fast
            write_progress(self.out, step, self.total_steps, (step - self.step_log) / elapsed)
        self.sums.zero_()
        self.n_micro = 0
        self.t_log, self.step_log = now, step

    def close(self) -> None:
        self.logger.close()


class Trainer:
    """Runs one job (a defense, an attack, head fitting: cli.build_job) on the DeepSpeed engine."""

    def __init__(self, cfg: RunConfig, job: Job):
        self.cfg = cfg
        self.job = job
        self.name = self.job.name
        self.out = Path(cfg.output_dir)

    def train(self) -> dict:
        """Run the job to its last step, or until stopped, preempted or diverged; export at the end."""
        cfg = self.cfg
        with self._session():
            if cfg.resume == "auto":
                finished = run_on_main(finished_summary, self.out, to_dict(cfg))
                if finished is not None:
                    from .data.pipeline import shard_urls

                    self.model_dir = Path(cfg.model.path) if cfg.model.path else self.out / "input_model"
                    self.urls = shard_urls(cfg.data.train_urls) if cfg.data.train_urls else []
                    if self.dist.is_main:
                        print(f"{self.name}: {self.out} already finished at step {finished.get('steps')} "
                              f"(summary.json, model/); nothing to resume, nothing changed", flush=True)
                    return {**finished, "already_finished": True}
            loaded, data, engine, total = self._build()
            step, samples = self.checkpointer.restore(engine, self.resume_plan)
            self.step_started = step
            if self.dist.is_main:
                record_attempt(self.out, "start", from_step=step, total_steps=total, world_size=self.dist.world_size,
                               nodes=os.environ.get("SLURM_JOB_NODELIST") or socket.gethostname())
            metrics = StepMetrics(engine, data, self.params, step, total, info=self.dist, out=self.out,
                                  global_batch_size=cfg.train.global_batch_size, last_good=self.checkpointer.last_good)
            keys = KeyLog(self.out / "keys", self.dist.rank, self.dist.world_size, step) if cfg.data.record_keys else None
            bar = tqdm(total=total, initial=step, disable=not self.dist.is_main, desc=self.name, unit="step", dynamic_ncols=True)
            stopping = self._stopping(step, total)  # a resume may start at the end
            self.preemption.deferring = True  # Ctrl-C from here on stops at a step boundary (preempt.py)
            step_timeout(cfg.preempt.collective_timeout)  # a lost peer is noticed within this from here on
            while stopping is None:
                epoch, done_in_epoch = divmod(step, data.steps_per_epoch)
                micro = done_in_epoch * data.grad_accum
                for features in data.micro_batches(epoch, skip=micro):
                    if keys:
                        keys.write(step + 1, epoch, micro, features)
                    out = engine(**data.to_batch(features, epoch, micro, engine.device))
                    engine.backward(out["loss"])
                    engine.step()
                    metrics.accumulate(out)
                    micro += 1
                    if micro % data.grad_accum:
                        continue  # gradient accumulation: the optimizer step happens at the boundary
                    step += 1
                    samples += cfg.train.global_batch_size
                    bar.update(1)
                    stopping = self._stopping(step, total, engine)
                    save = self.checkpointer.due(step, total) or stopping is not None
                    if save or step % cfg.train.log_every == 0:
                        metrics.check_finite(step)  # before anything is logged as progress or saved
                    if step % cfg.train.log_every == 0 or step == total:
                        metrics.log(step, bar)
                    if save:
                        self.checkpointer.save(engine, step, samples)
                    if stopping:
                        break
            self.preemption.deferring = False
            step_timeout(None)  # the export: rank 0 writes the model while the others wait
            bar.close()
            metrics.close()
            if keys:
                keys.close()
            if stopping != "done":
                return self._stopped(stopping, step, total)
            return self._export(engine, loaded, step, samples, metrics.last)

    # ------------------------------------------------------------------ around the loop
    @contextmanager
    def _session(self):
        """Signal handlers, the process group and the output directory's lock, for the run's life."""
        # First of all: a scheduler's warning that arrives while the model loads must not kill
        # the process (SIGUSR1's default action); the flag is acted on at the first step boundary.
        self.preemption = Preemption(self.cfg.preempt.signals)
        try:
            with process_group(self.cfg.preempt.collective_timeout) as self.dist:
                if self.dist.is_main and len({p["host"] for p in peers()}) > 1:
                    print(describe_world(), flush=True)
                self.t_start = time.time()
                # Rank 0 locks output_dir for the run's life and refuses another run's directory (rundir.py).
                self.run_dir = RunDir(self.out)
                try:
                    self.run_id = run_on_main(self.run_dir.claim, fresh=not self.cfg.resume, overwrite=self.cfg.overwrite)
                    if self.dist.is_main:
                        clear_failure_notes(self.out)
                    barrier()  # no rank can fail, and leave a note, before the old notes are gone
                    yield
                except Exception as e:
                    if self.dist.world_size > 1 and (is_collective_failure(e) or a_peer_is_lost()):
                        raise self._lost_peer(e) from None
                    if launcher_gone():
                        raise self._lost_launcher(e) from None
                    report_own_failure(str(e) or type(e).__name__, self.out)  # the others then stop without requeueing (distributed.diagnose)
                    raise
                finally:
                    self.run_dir.release()
        finally:
            self.preemption.restore()

    def _model_dir(self) -> Path:
        if self.cfg.model.path:
            return Path(self.cfg.model.path)
        target = self.out / "input_model"

        def build() -> None:
            # Decided and built on rank 0 only, written aside and renamed: every rank enters the
            # collective, so none can see (and read) a half-written config.json while rank 0 writes it.
            if not (target / "config.json").is_file():
                write_dir_aside(target, lambda d: self.job.family.build_tiny(d, self.cfg.model.tiny, self.cfg.model.tiny.seed))

        run_on_main(build)
        return target

    def _check_precision(self) -> None:
        """Refuse a precision the accelerator cannot run, before DeepSpeed starts."""
        from deepspeed.accelerator import get_accelerator

        p = self.cfg.train.precision
        acc = get_accelerator()
        if (p == "fp16" and not acc.is_fp16_supported()) or (p == "bf16" and not acc.is_bf16_supported()):
            raise ConfigError(f"train.precision: {p!r} is not supported on this machine's accelerator ({acc.device_name()}); use fp32")

    def _build(self):
        """Model, data, resume plan and engine: (loaded model, TrainData, engine, total steps)."""
        cfg, info = self.cfg, self.dist
        note = fit_batch_to_world(cfg, info.world_size)  # before config.yaml, which records the micro batch used
        if note and info.is_main:
            print(note, flush=True)
        if info.is_main and not cfg.resume:
            write_run_config(self.out, cfg)
        self._check_precision()
        torch.manual_seed(mix_seed(cfg.train.seed, Stream.TORCH_GLOBAL, info.rank))
        self.model_dir = self._model_dir()
        loaded = self.job.load(self.model_dir, cfg)
        task = self.job.build_task(loaded, cfg)
        grad_accum = deepspeed_config(cfg, info.world_size)["gradient_accumulation_steps"]
        data = TrainData(cfg, info, self.job, loaded.processor, self.out, grad_accum)
        self.urls = data.urls
        total = data.total_steps()
        self.checkpointer = Checkpointer(cfg, self.out, info, self.run_id, data)
        self.resume_plan = self.checkpointer.plan_resume(task)
        ds_config = deepspeed_config(cfg, info.world_size, load_universal=self.resume_plan is not None and self.resume_plan.universal)
        self.params = [p for p in task.parameters() if p.requires_grad]
        schedule = cfg.optim.schedule if cfg.optim.schedule == "linear" else "constant_with_warmup"
        engine, _, _, _ = deepspeed.initialize(
            model=task, model_parameters=self.params, config=ds_config,
            lr_scheduler=lambda opt: get_scheduler(schedule, opt, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=total),
        )
        # Training mode on every module the engine wraps: `from_pretrained` returns models in eval
        # mode (dropout off), and a job's task may keep frozen parts in eval through its own train().
        engine.train()
        return loaded, data, engine, total

    def _stopping(self, step: int, total: int, engine=None) -> str | None:
        """Why the loop ends after `step`, if it does: done, stop_at (train.stop_at_step) or preempted.
        With the engine it is called at every step on every rank: the preemption flag is agreed by a
        collective, so every rank stops after the same step (preempt.py)."""
        if self.preemption.interrupted():
            raise KeyboardInterrupt  # Ctrl-C in the loop is acted on here, before this step's save (preempt.py)
        preempted = engine is not None and self.preemption.agreed(engine.device)
        if step >= total:
            return "done"
        if preempted:
            return "preempted"
        if self.cfg.train.stop_at_step and step >= self.cfg.train.stop_at_step:
            return "stop_at"
        return None

    def _lost_peer(self, e: Exception) -> RecipeError:
        """A collective failed: name the lost peer and, under SLURM, requeue the job (any surviving
        rank may: rank 0 may be the one lost). The partial step is dropped; the requeued job resumes
        from the last complete checkpoint."""
        line, requeue_helps = diagnose(e, self.out)
        return self._ended(line, requeue_helps)

    def _lost_launcher(self, e: Exception) -> RecipeError:
        """This rank's launcher died under it (its slurmstepd crashed, say): the error (typically a
        BrokenPipeError from a log line) is not the rank's own, so it leaves no failure note. The
        other ranks then see its process gone, name it and requeue (`_lost_peer`); a rank alone
        requeues the job itself. Nobody reads this rank's stderr any more: a lone rank's line goes
        to attempts.jsonl."""
        line = f"its launcher is gone (stdout/stderr lost their reader: srun or slurmstepd died; {type(e).__name__}: {e})"
        if self.dist.world_size > 1:
            return RecipeError(f"rank {self.dist.rank}: {line}; left to the other ranks, which requeue")
        return self._ended(line, requeue_helps=True)

    def _ended(self, line: str, requeue_helps: bool) -> RecipeError:
        """Requeue under SLURM where that helps, record the attempt's end, and the error to raise."""
        if requeue_helps:
            try:
                line += "; " + requeue(self.cfg.preempt.requeue, self.cfg.preempt.max_requeues)
            except RecipeError as refused:
                line += "; " + str(refused)
        if hasattr(self, "step_started"):
            try:
                record_attempt(self.out, "end", outcome=f"rank {self.dist.rank}: {line}")
            except OSError:
                pass
        return RecipeError(f"rank {self.dist.rank}: {line}")

    def _stopped(self, why: str, step: int, total: int) -> dict:
        if self.dist.is_main:
            record_attempt(self.out, "end", step=step, outcome=f"{self.preemption.signal_name.removeprefix('SIG')} received"
                           if why == "preempted" else "train.stop_at_step")
        if why == "preempted":
            # Rank 0 decides and requeues; a refusal (too many requeues) is raised on every rank.
            what = run_on_main(requeue, self.cfg.preempt.requeue, self.cfg.preempt.max_requeues)
            if self.dist.is_main:
                print(f"{self.preemption.signal_name.removeprefix('SIG')} received: saved step {step}/{total}; {what}", flush=True)
            return {"steps": step, "stopped": True, "preempted": True}
        if self.dist.is_main:
            print(f"stopped at step {step}/{total} (train.stop_at_step); continue with --resume auto")
        return {"steps": step, "stopped": True}

    def _write_model(self, loaded, state) -> dict[str, str]:
        """The job's export, written aside and renamed into model/ (rundir.write_dir_aside);
        returns the sha256 of each weight file."""
        files: list = []
        try:
            digests = write_dir_aside(self.out / "model", lambda d: files.extend(self.job.export(loaded, state, d)))
        except RecipeError as e:
            raise RecipeError(f"export: {e}; the run's checkpoints are intact, so `--resume auto` writes the model once "
                              "the cause is fixed") from None
        weights = {Path(f).name for f in files}
        return {name: sha for name, sha in digests.items() if Path(name).name in weights}

    def _export(self, engine, loaded, step: int, samples: int, last: dict | None) -> dict:
        """Write the trained model (rank 0, refusing non-finite tensors) and summary.json."""
        state = self.checkpointer.consolidated_state(engine, loaded.model)
        summary = {"steps": step, "total_steps": step}
        if self.dist.is_main:
            bad = [k for k, v in state.items() if v is not None and v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise RecipeError(f"export refused: {len(bad)} tensor(s) hold non-finite values (first: {bad[0]}); nothing was written to {self.out / 'model'}")
            out_digests = self._write_model(loaded, state)
            summary = {
                "steps": step,
                "samples": samples,
                "wall_time_s": round(time.time() - self.t_start, 3),
                "world_size": self.dist.world_size,
                "zero_stage": self.cfg.train.zero_stage,
                **{f"final_{k}": v for k, v in (last or {}).items()},
                "input_weights_sha256": sha256_files(loaded.weight_files),
                "output_weights_sha256": out_digests,
            }
            write_summary(self.out, summary)
            record_attempt(self.out, "end", step=step, outcome="finished")
        barrier()
        return summary
