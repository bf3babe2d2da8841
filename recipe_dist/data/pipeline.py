"""Streaming auxiliary text from WebDataset shards.

Order, as in open_clip: shard list -> seeded shard shuffle -> split by node -> split by worker ->
read tar -> decode -> seeded sample shuffle -> preprocess (e.g. tokenize) -> batch. Every shuffle is seeded from
(seed, epoch) so an epoch's stream is a pure function of them; the trainer can therefore resume
by skipping the micro-batches it has already consumed.

Every rank must take the same number of optimizer steps or collectives hang. The epoch length is
fixed from the global sample count (`steps_per_epoch`); a rank whose shards run short wraps
around its own stream, one that has more stops early.
"""

from __future__ import annotations

from functools import partial

import io
import queue
import random
import tarfile
import threading
import time
import zlib
from typing import Callable, Iterator, NamedTuple

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from ..seeds import Stream, mix_seed
from . import storage
from .storage import DataError, StorageOptions

__all__ = ["DataError", "StorageOptions", "epoch_stream", "rank_micro_batches", "shard_urls", "count_samples", "text_decoder"]


def pad_rows(rows: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists to the longest; returns (ids [B, T], mask [B, T] with 1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def shard_urls(spec: str) -> list[str]:
    """Shard URLs from a spec: brace patterns (`::` joins several, as in webdataset), a prefix
    ending in `/` (every `*.tar` object below it) or a glob (`*`, `?`, `[`); listed URLs are sorted.
    """
    urls: list[str] = []
    for url in expand_urls(spec):
        if url.endswith("/") or any(c in url.split("://", 1)[-1] for c in "*?["):
            found = storage.list_shards(url)
            if not found:
                raise DataError(f"data.train_urls: no shards under {url}")
            urls += found
        else:
            urls.append(url)
    if not urls:
        raise DataError(f"data.train_urls: no shards in {spec!r}")
    return urls


def text_decoder(text_key: str) -> Callable[[dict], dict]:
    """Decode a raw text sample: its `text_key` field as UTF-8 into {"__key__", "text"}."""

    def decode(sample: dict) -> dict:
        if text_key not in sample:
            raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no field '{text_key}'")
        raw = sample[text_key]
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        return {"__key__": sample["__key__"], "text": text}

    return decode


def check_shards_exist(urls: list[str]) -> None:
    """A one-line DataError naming the first shard that is missing or unreadable."""
    for url in urls:
        storage.exists(url)


def check_shard_count(n_shards: int, world_size: int, num_workers: int, resampled: bool) -> None:
    """Every rank x worker needs a shard of its own, unless shards are drawn with replacement."""
    readers = world_size * max(1, num_workers)
    if n_shards < readers and not resampled:
        raise DataError(
            f"data.train_urls: {n_shards} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers "
            f"(needs >= {readers}); write more, smaller shards (recipe-dist shards --samples-per-shard), or pass --data.resampled=true to draw shards with replacement"
        )


CORRUPT = (tarfile.TarError, EOFError, zlib.error, ValueError)


def shard_samples(url: str, on_corrupt: str = "fail", record: bool = True, stream=None, expected=None) -> Iterator[dict]:
    """The samples of one tar shard, grouped by key as webdataset does (`{"__key__", "__url__", ext: bytes}`).

    A damaged shard (bad header, truncated member, or no end-of-archive block, i.e. cut at a
    member boundary, which tarfile alone reads as a clean end) raises a DataError naming it with
    on_corrupt="fail". With "skip" the samples read before the damage are kept, the rest of the
    shard is dropped with a warning, and `corrupt_skipped` is counted (when `record`).
    Storage errors are never "corrupt": they are retried, then fail the run.

    `stream` reads the shard from an already opened (e.g. prefetched) object. With `expected`
    (its manifest entry), a size or sample count that disagrees is corruption too.
    """
    if stream is None:
        stream = storage.wds_gopen.gopen(url) if storage.is_remote(url) else storage.open_url(url)
    current = None
    n = 0
    try:
        with stream:
            try:
                size = storage.stream_size(stream)
                if expected is not None and size is not None and size != expected.bytes:
                    raise tarfile.TarError(f"{size} bytes, but its manifest entry says {expected.bytes}")
                tar = tarfile.open(fileobj=stream, mode="r|*")
                for member in tar:
                    if not member.isreg():
                        continue
                    data = tar.extractfile(member).read()
                    tar.members = []  # stream mode keeps every header otherwise
                    prefix, suffix = base_plus_ext(member.name)
                    if prefix is None or member.name.rsplit("/", 1)[-1].startswith("__"):
                        continue
                    if current is not None and prefix != current["__key__"]:
                        yield current
                        n += 1
                        current = None
                    if current is None:
                        current = {"__key__": prefix, "__url__": url}
                    suffix = suffix.lower()
                    if suffix in current:
                        raise tarfile.TarError(f"duplicate member {member.name}")
                    current[suffix] = data
                if getattr(tar.fileobj, "comptype", "tar") == "tar" and size is not None and size - tar.offset < tarfile.BLOCKSIZE:
                    raise tarfile.TarError(f"truncated: no end-of-archive block after {tar.offset} of {size} bytes")
                if expected is not None and n + (current is not None) != expected.samples:
                    raise tarfile.TarError(f"{n + (current is not None)} samples, but its manifest entry says {expected.samples}")
            except CORRUPT as e:
                reason = storage.redact(str(e) or type(e).__name__)
                if on_corrupt != "skip":
                    raise DataError(f"corrupt shard {url}: {reason} (data.on_corrupt=skip drops the damaged rest of a shard)") from None
                if record:
                    storage.count("corrupt_skipped")
                storage.warn(f"corrupt shard {url}: {reason}; skipped its rest after {n} samples (data.on_corrupt=skip)")
                return
    except OSError as e:  # a local file that cannot be read
        raise storage.storage_error(url, e) from None
    if current is not None:
        yield current


def count_samples(urls: list[str], on_corrupt: str = "fail") -> int:
    """Samples in all shards (distinct keys), read the way the pipeline reads them."""
    return sum(sum(1 for _ in shard_samples(url, on_corrupt, record=False)) for url in urls)


def _fetch_whole(url: str, max_bytes: int):
    """The whole object behind remote `url` as an in-memory stream, or None when it is larger than
    `max_bytes` (then it is read with ranged GETs as it is consumed). Retried like every read."""
    fs, path = storage.filesystem(url)
    size = storage.call(lambda: fs.info(path), url)["size"]
    if size > max_bytes:
        return None

    def get() -> bytes:
        data = fs.cat_file(path)
        if len(data) != size:  # a connection cut mid-body: transient, so retried
            raise storage.ShortRead(f"got {len(data)} of {size} bytes")
        return data

    return io.BytesIO(storage.call(get, url))


_END = object()


def prefetched(urls: Iterator[str], depth: int, max_bytes: int) -> Iterator[tuple[str, object]]:
    """(url, stream or None) in order, with up to `depth` remote shards fetched ahead by a
    background thread while the current one is consumed. Memory is bounded by depth + 1 shards of
    at most `max_bytes` each. A failed fetch is raised when its shard's turn comes, so errors,
    retries and the order are exactly those of reading without prefetch."""
    if depth <= 0:
        yield from ((u, None) for u in urls)
        return
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        for url in urls:
            if stop.is_set():
                return
            try:
                put((url, _fetch_whole(url, max_bytes) if storage.is_remote(url) else None))
            except BaseException as e:  # delivered in order, raised by the consumer
                put((url, e))
                return
        put(_END)

    thread = threading.Thread(target=work, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is _END:
                return
            url, got = item
            if isinstance(got, BaseException):
                raise got
            yield url, got
    finally:
        stop.set()


def _read_shards(on_corrupt: str, options: StorageOptions | None, manifest: dict | None = None, prefetch: int = 0,
                 prefetch_max_bytes: int = 512 << 20):
    def stage(src):
        if options is not None:
            storage.configure(options)  # this may be a fresh DataLoader worker
        urls = (item["url"] for item in src)  # lazily: a resampled source never ends
        for url, stream in prefetched(urls, prefetch, prefetch_max_bytes):
            yield from shard_samples(url, on_corrupt, stream=stream, expected=(manifest or {}).get(url))

    return stage


def shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a pure function of (urls, seed, epoch).

    Exactly what webdataset's detshuffle gives a full-buffer shuffle seeded with
    mix_seed(seed, SHARD_ORDER) + epoch, so runs and checkpoints from before this function keep
    their order."""
    from webdataset.filters import _shuffle

    rng = random.Random()
    rng.seed(mix_seed(seed, Stream.SHARD_ORDER) + epoch)
    return [item["url"] for item in _shuffle(iter([{"url": u} for u in urls]), len(urls), len(urls), rng)]


def assign(order: list[str], rank: int, world_size: int, worker: int, workers: int) -> list[str]:
    """The shards one (rank, DataLoader worker) reads from an epoch's `order`: every shard goes to
    exactly one reader, and readers' counts differ by at most one (node split, then worker split)."""
    mine = order[rank::world_size] if world_size > 1 else order
    return mine[worker::workers] if workers > 1 else mine


def assign_shards(urls: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int, workers: int) -> list[str]:
    """Shard assignment as a pure function of (seed, epoch, rank, world size, worker, workers)."""
    return assign(shard_order(urls, seed, epoch), rank, world_size, worker, workers)


def _assigned_shards(urls: list[str], seed: int, epoch: int, reader: tuple[int, int, int, int] | None = None):
    """The pipeline's source: this process's (rank, worker) share of the epoch's shards, or the
    share of an explicit `reader` (rank, world size, worker, workers), e.g. a rank of an earlier
    world size whose stream an elastic resume replays."""

    def source():
        rank, world_size, worker, workers = reader or wds.utils.pytorch_worker_info()
        for url in assign_shards(urls, seed, epoch, rank, world_size, worker, workers):
            yield {"url": url}

    return source


def _resampled_shards(urls: list[str], seed: int, epoch: int):
    """An endless stream of shards drawn with replacement, seeded per (epoch, rank, worker)."""

    def source():
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        rng = random.Random(mix_seed(seed, Stream.RESAMPLED_SHARDS, epoch, rank, worker))
        while True:
            yield {"url": rng.choice(urls)}

    return source


class CountedBatch(NamedTuple):
    """A micro-batch with the storage counts of the worker that made it (a namedtuple survives
    DataLoader's default_convert; a plain tuple would come back as a list)."""

    batch: list | None
    counts: dict


def _with_counts(src):
    """Batches paired with this worker's storage counts since the last one; an error travels as a value.

    DataLoader workers are other processes: this is how their retry and skip counts reach the
    trainer, and how a DataError reaches it as the one line it is rather than a worker traceback.
    """
    worker = torch.utils.data.get_worker_info() is not None
    try:
        for batch in src:
            yield CountedBatch(batch, storage.take_counts() if worker else {})
    except DataError as e:
        yield CountedBatch(None, {"__error__": str(e), **(storage.take_counts() if worker else {})})


def epoch_stream(
    urls: list[str],
    epoch: int,
    seed: int,
    decode: Callable[[dict], dict] | str,
    preprocess: Callable[[dict], dict],
    micro_batch_size: int,
    shuffle_buffer: int,
    *,
    on_corrupt: str = "fail",
    resampled: bool = False,
    options: StorageOptions | None = None,
    manifest: dict | None = None,
    prefetch: int = 0,
    prefetch_max_bytes: int = 512 << 20,
    reader: tuple[int, int, int, int] | None = None,
) -> wds.DataPipeline:
    """The pipeline for one epoch on this rank (and worker); yields lists of preprocessed samples.

    `decode` turns a raw sample (`{"__key__", "__url__", ext: bytes}`) into what the job's
    `preprocess` reads; a string is a text field's name (`text_decoder`). `resampled` draws shards with replacement instead of
    splitting them over ranks and workers.
    """
    if isinstance(decode, str):
        decode = text_decoder(decode)

    if resampled:
        shards = [_resampled_shards(urls, seed, epoch)]
    else:
        shards = [_assigned_shards(urls, seed, epoch, reader)]
    return wds.DataPipeline(
        *shards,
        _read_shards(on_corrupt, options, manifest, prefetch, prefetch_max_bytes),
        wds.map(decode),
        wds.map(partial(_with_epoch, epoch)),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=mix_seed(seed, Stream.SAMPLE_SHUFFLE, epoch)),
        wds.map(preprocess),
        wds.batched(micro_batch_size, collation_fn=list, partial=False),
    )


def _with_epoch(epoch: int, sample: dict) -> dict:
    """The epoch travels with each sample, so a per-sample random draw (an image crop) can differ
    per epoch and still be a pure function of (seed, epoch, key): the same after a resume."""
    sample["__epoch__"] = epoch
    return sample


class WaitTimer:
    """Seconds spent blocked in next() on the data iterator (see `timed`)."""

    def __init__(self) -> None:
        self.wait = 0.0

    def take(self) -> float:
        w, self.wait = self.wait, 0.0
        return w


def timed(it, timer: WaitTimer):
    """Iterate `it`, adding the time each next() blocks to `timer.wait` (the trainer's data wait)."""
    it = iter(it)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                timer.wait += time.perf_counter() - t0
            yield item
    finally:
        if hasattr(it, "close"):  # closing this closes the source (e.g. stops a prefetch thread) at once
            it.close()


def rank_micro_batches(
    make_stream: Callable[[int], Iterator],
    epoch: int,
    quota: int,
    num_workers: int,
    skip: int = 0,
    seed: int = 0,
) -> Iterator[list[dict]]:
    """Exactly `quota` micro-batches of `epoch` for this rank, minus the first `skip`.

    Wraps around this rank's stream when its shards hold fewer samples than the quota. The
    storage counts that come with each batch are added to this process's totals.
    """
    produced = 0
    while produced < quota:
        stream = make_stream(epoch)
        if isinstance(stream, wds.DataPipeline):
            stream = stream.compose(_with_counts)
        loader = (
            # An explicit generator: DataLoader otherwise draws its worker seeds from the global
            # torch RNG, which would make dropout differ between a resumed and a straight run.
            wds.WebLoader(
                stream,
                batch_size=None,
                num_workers=num_workers,
                generator=torch.Generator().manual_seed(mix_seed(seed, Stream.LOADER_WORKERS, epoch, produced)),
            )
            if num_workers > 0
            else stream
        )
        got = 0
        for item in loader:
            batch, delta = item if isinstance(item, CountedBatch) else (item, {})
            delta = dict(delta)
            error = delta.pop("__error__", None)
            storage.add_counts(delta)
            if error is not None:
                raise DataError(error)
            got += 1
            if produced >= skip:
                yield batch
            produced += 1
            if produced >= quota:
                return
        if got == 0:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            raise DataError(f"rank {rank} received no complete micro-batch from its shards; use more shards or a smaller micro batch")
