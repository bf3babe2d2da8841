"""The training data facade: one object answers everything the loop asks of the auxiliary data.

`TrainData` lists the shards (or writes the family's SYNTHETIC corpus when none are given),
counts the samples, fixes the epoch length, and hands out an epoch's micro-batches for this rank
(`micro_batches(epoch, skip)`), collated (`to_batch`), with the loader's health (`stats`).
Decoding, preprocessing and collation come from the job, so the facade knows no modality.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch

from ..config import ConfigError
from ..distributed import run_on_main
from ..seeds import Stream, mix_seed
from . import manifest, storage
from .pipeline import WaitTimer, check_shard_count, epoch_stream, rank_micro_batches, shard_urls, timed
from .shards import write_shards


class TrainData:
    def __init__(self, cfg, dist, job, processor, out_dir: Path, grad_accum: int):
        self.cfg, self.dist, self.job = cfg, dist, job
        self.options = storage.StorageOptions.from_config(cfg.data)
        storage.configure(self.options)
        self.urls = self._shard_urls(out_dir)
        check_shard_count(len(self.urls), dist.world_size, cfg.data.num_workers, cfg.data.resampled)
        # One small read per directory with a manifest; without one, every shard is read once (rank 0).
        self.num_samples, self.manifest = run_on_main(manifest.counts, self.urls, cfg.data.on_corrupt)
        self.steps_per_epoch = self.num_samples // cfg.train.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} exceeds the {self.num_samples} samples in data.train_urls")
        self.grad_accum = grad_accum
        self.decode = job.decode(cfg)
        self.preprocess = job.preprocess(processor, cfg)
        self.collate = job.collate(processor, cfg)
        self.timer = WaitTimer()
        self.elastic: dict | None = None  # set by load_state_dict when a mid-epoch checkpoint came from another world size

    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))

    def _shard_urls(self, out_dir: Path) -> list[str]:
        cfg = self.cfg
        if not cfg.data.train_urls:
            cfg.check_training_data()  # a real model never falls back to synthetic text silently
            prefix = out_dir / "data" / "synthetic"

            def make():
                samples = self.job.family.synthetic_corpus(cfg.data.synthetic_samples, seed=cfg.train.seed)
                n_shards = max(8, 2 * self.dist.world_size * max(1, cfg.data.num_workers))
                return write_shards(samples, str(prefix), math.ceil(len(samples) / n_shards), key_prefix="synthetic-")

            urls = run_on_main(make)
            if self.dist.is_main:
                print(f"data: SYNTHETIC corpus of {cfg.data.synthetic_samples} samples ({prefix}-*.tar); pass --data.train_urls for real data")
            return urls
        return run_on_main(shard_urls, cfg.data.train_urls)  # a prefix or glob is listed once, on rank 0

    def _stream(self, epoch: int, micro_batch_size: int, reader: tuple[int, int, int, int] | None = None):
        cfg, d = self.cfg, self.cfg.data
        return epoch_stream(self.urls, epoch, cfg.train.seed, self.decode, self.preprocess, micro_batch_size, d.shuffle_buffer,
                            on_corrupt=d.on_corrupt, resampled=d.resampled, options=self.options, manifest=self.manifest,
                            prefetch=d.prefetch_shards, prefetch_max_bytes=d.prefetch_max_mb << 20, reader=reader)

    def micro_batches(self, epoch: int, skip: int = 0) -> Iterator[list[dict]]:
        """This rank's micro-batches (lists of preprocessed samples) of `epoch`, minus the first `skip`;
        the time blocked on them accumulates in the wait timer."""
        cfg, d = self.cfg, self.cfg.data
        if self.elastic is not None and epoch == self.elastic["epoch"]:
            return timed(self._elastic_batches(epoch, skip), self.timer)
        quota = self.steps_per_epoch * self.grad_accum  # micro-batches per rank per epoch, equal on every rank
        make_stream = lambda ep: self._stream(ep, cfg.train.micro_batch_size)  # noqa: E731
        batches = rank_micro_batches(make_stream, epoch, quota, d.num_workers, skip=skip, seed=cfg.train.seed)
        if d.num_workers == 0 and d.prefetch_batches > 0:
            # Without DataLoader workers the pipeline (read, decode, tokenize) would run between
            # steps; a thread keeps it prefetch_batches ahead while the step computes (torch
            # releases the GIL in its kernels). DataLoader workers prefetch on their own.
            batches = ahead(batches, d.prefetch_batches)
        return timed(batches, self.timer)

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self, step: int, samples: int) -> dict:
        """Where the data stands after `step`, saved by the Checkpointer with every checkpoint: a
        resume continues at epoch `epoch`, skipping the `samples_in_epoch` samples it has seen of it."""
        t = self.cfg.train
        epoch, done = divmod(step, self.steps_per_epoch)
        return {
            "epoch": epoch, "samples": samples, "samples_in_epoch": done * t.global_batch_size, "seed": t.seed,
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "world_size": self.dist.world_size, "steps_per_epoch": self.steps_per_epoch, "num_samples": self.num_samples,
            # with the world size and micro batch: enough to replay each old reader's stream (exact elastic resume)
            "num_workers": self.cfg.data.num_workers,
        }

    def load_state_dict(self, saved: dict | None) -> bool:
        """Continue from a checkpoint's data state (`state_dict`; the loop positions itself from
        the step). A mid-epoch checkpoint written by another world size continues exactly: the rest of its
        epoch is what the old world would have read, step by step (see `_elastic_batches`).
        Returns whether that applies (False: same world size, an epoch boundary, resampled shards
        or a checkpoint that predates the recorded reader counts)."""
        if not saved or saved.get("world_size") == self.dist.world_size or not saved.get("samples_in_epoch"):
            return False
        if self.cfg.data.resampled or "num_workers" not in saved:
            return False
        n = saved["world_size"]
        gbs = self.cfg.train.global_batch_size
        self.elastic = {"epoch": saved["epoch"], "world_size": n, "micro_batch_size": saved["micro_batch_size"],
                        "num_workers": saved["num_workers"], "grad_accum": gbs // (saved["micro_batch_size"] * n)}
        return True

    def _old_rank_batches(self, rank: int, epoch: int, skip: int) -> Iterator[list[dict]]:
        """Old rank `rank`'s micro-batches of `epoch` from its `skip`-th on, as that rank read them:
        its DataLoader workers' pipelines interleaved round-robin (PyTorch's order), wrapping as
        rank_micro_batches does. Read in this process, without workers."""
        old = self.elastic
        workers = max(1, old["num_workers"])

        def make_stream(ep: int):
            pipes = [iter(self._stream(ep, old["micro_batch_size"], reader=(rank, old["world_size"], w, workers))) for w in range(workers)]

            def round_robin():
                live = list(pipes)
                while live:
                    for it in list(live):
                        try:
                            yield next(it)
                        except StopIteration:
                            live.remove(it)

            return round_robin()

        quota = self.steps_per_epoch * old["grad_accum"]
        return rank_micro_batches(make_stream, epoch, quota, 0, skip=skip, seed=self.cfg.train.seed)

    def _elastic_batches(self, epoch: int, skip: int) -> Iterator[list[dict]]:
        """The rest of `epoch` after a world-size change: step t's global batch is exactly the old
        world's step t (old rank r's samples at positions [r, r + 1) x gbs/N of it), and this rank
        takes the slice [rank, rank + 1) x gbs/M of it, split into its micro-batches. Each new
        rank reads only the old ranks' streams its slice overlaps (at most ceil(N/M) + 1)."""
        old, gbs = self.elastic, self.cfg.train.global_batch_size
        per_old, per_new = gbs // old["world_size"], gbs // self.dist.world_size
        lo, hi = self.dist.rank * per_new, (self.dist.rank + 1) * per_new
        first_step = skip // self.grad_accum
        needed = range(lo // per_old, (hi - 1) // per_old + 1)
        streams = {r: self._old_rank_batches(r, epoch, first_step * old["grad_accum"]) for r in needed}
        mbs = self.cfg.train.micro_batch_size
        for _ in range(first_step, self.steps_per_epoch):
            mine: list[dict] = []
            for r in needed:
                step_samples = [s for _ in range(old["grad_accum"]) for s in next(streams[r])]
                a, b = max(lo, r * per_old) - r * per_old, min(hi, (r + 1) * per_old) - r * per_old
                mine += step_samples[a:b]
            for m in range(self.grad_accum):
                yield mine[m * mbs:(m + 1) * mbs]

    def to_batch(self, features: list[dict], epoch: int, micro: int, device) -> dict[str, torch.Tensor]:
        """Collate micro-batch `micro` of `epoch`; its random masks depend on nothing else."""
        batch = self.collate(features, mix_seed(self.cfg.train.seed, Stream.DYNAMIC_MASK, epoch, micro, self.dist.rank))
        return {k: v.to(device) for k, v in batch.items()}

    def stats(self) -> list[float]:
        """This process's storage retries and skipped shards so far, and the seconds blocked on the
        loader since the last call."""
        return [*storage.counts().values(), self.timer.take()]


def ahead(items: Iterator, depth: int) -> Iterator:
    """`items` in order, produced up to `depth` ahead by a background thread; an exception is
    raised where it occurred in the sequence. Closing the generator stops the thread."""
    import queue
    import threading

    buf: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buf.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # delivered in order, raised by the consumer
            put((None, e))
            return
        put((end, None))

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buf.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        # Wait for the item in progress: a daemon thread still inside torch code (image
        # transforms) when the interpreter exits aborts the process ("terminate called without
        # an active exception"), e.g. after `prune` stops reading partway through an epoch.
        thread.join(timeout=60)


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
