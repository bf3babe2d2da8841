"""Streaming auxiliary text from WebDataset shards.

Order, as in open_clip: shard list -> seeded shard shuffle -> split by node -> split by worker ->
read tar -> decode -> seeded sample shuffle -> tokenize -> batch. Every shuffle is seeded from
(seed, epoch) so an epoch's stream is a pure function of them; the trainer can therefore resume
by skipping the micro-batches it has already consumed.

Every rank must take the same number of optimizer steps or collectives hang. The epoch length is
fixed from the global sample count (`steps_per_epoch`); a rank whose shards run short wraps
around its own stream, one that has more stops early.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import Callable, Iterator

import fsspec
import torch
import webdataset as wds
from webdataset.shardlists import expand_urls

from ..errors import RecipeError


class DataError(RecipeError, RuntimeError):
    """Bad or missing data; the message names the URL."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several ints; distinct tuples give unrelated streams."""
    h = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def key_seed(seed: int, tag: int, key: str) -> int:
    """A seed for one sample, from its whole `__key__` (stable across runs, ranks and workers)."""
    h = hashlib.blake2b(f"{int(seed)}:{int(tag)}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


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
    """Brace-expanded shard URLs (`::` separates several patterns, as in webdataset)."""
    urls = expand_urls(spec)
    if not urls:
        raise DataError(f"data.train_urls: no shards in {spec!r}")
    return urls


def check_shards_exist(urls: list[str]) -> None:
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise DataError(f"shard not found: {url}")


def count_samples(urls: list[str]) -> int:
    """Samples in all shards (distinct keys), read through fsspec."""
    total = 0
    for url in urls:
        keys = set()
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if member.isfile():
                        base = member.name.rsplit("/", 1)[-1]
                        keys.add(member.name[: len(member.name) - len(base)] + base.split(".", 1)[0])
        except FileNotFoundError:
            raise DataError(f"shard not found: {url}") from None
        except tarfile.TarError as e:
            raise DataError(f"corrupt shard {url}: {e}") from None
        total += len(keys)
    return total


def _raise_with_url(exn: Exception) -> bool:
    # webdataset appends the shard URL to the exception's args when opening or reading fails.
    url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "<unknown shard>"
    raise DataError(f"cannot read shard {url}: {exn.args[0] if exn.args else exn!r}") from exn


def epoch_stream(
    urls: list[str],
    epoch: int,
    seed: int,
    text_key: str,
    encode: Callable[[dict], dict],
    micro_batch_size: int,
    shuffle_buffer: int,
) -> wds.DataPipeline:
    """The pipeline for one epoch on this rank (and worker); yields lists of encoded samples."""

    def decode_text(sample: dict) -> dict:
        if text_key not in sample:
            raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no field '{text_key}'")
        raw = sample[text_key]
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        return {"__key__": sample["__key__"], "text": text}

    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        # detshuffle adds 1 to epoch before seeding, so start one below the epoch wanted.
        wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=mix_seed(seed, 0), epoch=epoch - 1),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_raise_with_url),
        wds.map(decode_text),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=mix_seed(seed, 1, epoch)),
        wds.map(encode),
        wds.batched(micro_batch_size, collation_fn=list, partial=False),
    )


def rank_micro_batches(
    make_stream: Callable[[int], Iterator[list[dict]]],
    epoch: int,
    quota: int,
    num_workers: int,
    skip: int = 0,
    seed: int = 0,
) -> Iterator[list[dict]]:
    """Exactly `quota` micro-batches of `epoch` for this rank, minus the first `skip`.

    Wraps around this rank's stream when its shards hold fewer samples than the quota.
    """
    produced = 0
    while produced < quota:
        stream = make_stream(epoch)
        loader = (
            # An explicit generator: DataLoader otherwise draws its worker seeds from the global
            # torch RNG, which would make dropout differ between a resumed and a straight run.
            wds.WebLoader(
                stream,
                batch_size=None,
                num_workers=num_workers,
                generator=torch.Generator().manual_seed(mix_seed(seed, 3, epoch, produced)),
            )
            if num_workers > 0
            else stream
        )
        got = 0
        for batch in loader:
            got += 1
            if produced >= skip:
                yield batch
            produced += 1
            if produced >= quota:
                return
        if got == 0:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            raise DataError(f"rank {rank} received no complete micro-batch from its shards; use more shards or a smaller micro batch")
