"""The training data facade: one object answers everything the loop asks of the auxiliary data.

`TrainData` lists the shards (or writes the family's SYNTHETIC corpus when none are given),
counts the samples, fixes the epoch length, and hands out an epoch's micro-batches for this rank
(`micro_batches(epoch, skip)`), collated (`to_batch`), with the loader's health (`stats`).
Decoding, encoding and collation come from the job, so the facade knows no modality.
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
from . import storage
from . import manifest
from .pipeline import WaitTimer, check_shard_count, epoch_stream, rank_micro_batches, shard_urls, timed
from .shards import write_shards


class TrainData:
    def __init__(self, cfg, dist, job, tokenizer, out_dir: Path, grad_accum: int):
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
        self.decode = job.decoder(cfg)
        self.encode = job.encoder(tokenizer, cfg)
        self.collate = job.collate(tokenizer, cfg)
        self.timer = WaitTimer()

    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))

    def _shard_urls(self, out_dir: Path) -> list[str]:
        cfg = self.cfg
        if not cfg.data.train_urls:
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

    def micro_batches(self, epoch: int, skip: int = 0) -> Iterator[list[dict]]:
        """This rank's micro-batches (lists of encoded samples) of `epoch`, minus the first `skip`;
        the time blocked on them accumulates in the wait timer."""
        cfg, d = self.cfg, self.cfg.data

        def make_stream(ep: int):
            return epoch_stream(self.urls, ep, cfg.train.seed, self.decode, self.encode, cfg.train.micro_batch_size, d.shuffle_buffer,
                                on_corrupt=d.on_corrupt, resampled=d.resampled, options=self.options, manifest=self.manifest,
                                prefetch=d.prefetch_shards, prefetch_max_bytes=d.prefetch_max_mb << 20)

        quota = self.steps_per_epoch * self.grad_accum  # micro-batches per rank per epoch, equal on every rank
        return timed(rank_micro_batches(make_stream, epoch, quota, d.num_workers, skip=skip, seed=cfg.train.seed), self.timer)

    def to_batch(self, features: list[dict], epoch: int, micro: int, device) -> dict[str, torch.Tensor]:
        """Collate micro-batch `micro` of `epoch`; its random masks depend on nothing else."""
        batch = self.collate(features, mix_seed(self.cfg.train.seed, Stream.DYNAMIC_MASK, epoch, micro, self.dist.rank))
        return {k: v.to(device) for k, v in batch.items()}

    def stats(self) -> list[float]:
        """This process's storage retries and skipped shards so far, and the seconds blocked on the
        loader since the last call."""
        return [*storage.counts().values(), self.timer.take()]


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
