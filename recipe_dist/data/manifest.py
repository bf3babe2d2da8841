"""Shard manifests: what is in each shard, written once, read at every start.

`manifest.json` sits next to the shards it describes (one per directory or prefix):

    {"version": 1, "shards": [{"url": "aux-000000.tar", "samples": 1000, "bytes": 1843200, "sha256": "..."}, ...]}

`url` is relative to the manifest, so a directory of shards can be uploaded as it is. With a
manifest, a run learns its sample counts from one small read per directory instead of reading
every shard, so the time to the first step grows with the shard count only through the listing.
A shard whose size or sample count disagrees with its entry is corrupt (handled under
data.on_corrupt). `recipe-dist shards` writes the manifest with the shards; `recipe-dist shards
--manifest-only URLS` writes one for shards that exist, streaming each once.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

from . import storage

MANIFEST = "manifest.json"
VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    url: str  # relative to the manifest when stored; absolute once loaded
    samples: int
    bytes: int
    sha256: str


def _split(url: str) -> tuple[str, str]:
    """(directory, name) of a shard URL or path."""
    head, _, name = url.rpartition("/")
    return head, name


def manifest_url(directory: str) -> str:
    return f"{directory}/{MANIFEST}" if directory else MANIFEST


class _Hashing(io.RawIOBase):
    """A read-through stream that hashes and counts every byte read from `inner`."""

    def __init__(self, inner):
        self.inner, self.sha, self.size = inner, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.size += n
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


def scan_shard(url: str) -> ShardInfo:
    """Sample count, size and sha256 of one shard, from a single streamed read (storage retries apply)."""
    from .pipeline import shard_samples

    hashing = _Hashing(storage.open_url(url))
    stream = _KeepOpen(hashing, buffer_size=1 << 20)
    try:
        n = sum(1 for _ in shard_samples(url, "fail", record=False, stream=stream))
        while stream.read(1 << 20):  # the tail after the end-of-archive blocks belongs to the object too
            pass
    finally:
        stream.really_close()
    return ShardInfo(url, n, hashing.size, hashing.sha.hexdigest())


class _KeepOpen(io.BufferedReader):
    """A stream the tar reader may "close" while the rest of the object is still to be hashed."""

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        super().close()


def write(infos: list[ShardInfo]) -> list[str]:
    """One manifest per directory of `infos`; returns their URLs."""
    by_dir: dict[str, list[dict]] = {}
    for info in infos:
        directory, name = _split(info.url)
        by_dir.setdefault(directory, []).append({**asdict(info), "url": name})
    written = []
    for directory, entries in by_dir.items():
        target = manifest_url(directory)
        fs, path = storage.filesystem(target)
        # Other shard sets in the same directory keep their entries.
        names = {e["url"] for e in entries}
        try:
            old = json.loads(storage.call(lambda: fs.cat_file(path), target, "read", "manifest")).get("shards", [])
        except (FileNotFoundError, storage.DataError, ValueError, AttributeError):
            old = []
        entries = [e for e in old if isinstance(e, dict) and e.get("url") not in names] + entries
        body = json.dumps({"version": VERSION, "shards": sorted(entries, key=lambda e: e["url"])}, indent=1) + "\n"
        if not storage.is_remote(target):
            import os

            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        storage.call(lambda: fs.pipe_file(path, body.encode()), target, "write", "manifest")
        written.append(target)
    return written


def load(urls: list[str]) -> dict[str, ShardInfo] | None:
    """The manifest entry of every URL in `urls`, or None when any directory has no manifest or
    any shard no entry (then the caller counts by reading, as without manifests)."""
    found: dict[str, ShardInfo] = {}
    for directory in sorted({_split(u)[0] for u in urls}):
        target = manifest_url(directory)
        fs, path = storage.filesystem(target)
        try:
            if not storage.is_remote(target):
                with open(path, "rb") as fh:
                    data = fh.read()
            else:
                data = storage.call(lambda: fs.cat_file(path), target, "read", "manifest")
        except (FileNotFoundError, storage.DataError):
            return None
        try:
            doc = json.loads(data)
            entries = doc["shards"]
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')}")
            for e in entries:
                url = f"{directory}/{e['url']}" if directory else e["url"]
                found[url] = ShardInfo(url, int(e["samples"]), int(e["bytes"]), str(e["sha256"]))
        except (ValueError, KeyError, TypeError) as e:
            raise storage.DataError(f"{target}: not a recipe-dist shard manifest ({e}); rewrite it with recipe-dist shards --manifest-only") from None
    if any(u not in found for u in urls):
        return None
    return {u: found[u] for u in urls}


def counts(urls: list[str], on_corrupt: str = "fail") -> tuple[int, dict[str, ShardInfo] | None]:
    """(samples in `urls`, their manifest entries or None). Without a complete manifest every shard
    is read to count, with one warning naming the command that writes a manifest."""
    from .pipeline import check_shards_exist, count_samples

    entries = load(urls)
    if entries is not None:
        return sum(e.samples for e in entries.values()), entries
    check_shards_exist(urls)  # the first missing shard as one line, before any is read
    storage.warn(f"no shard manifest covers data.train_urls: counting samples by reading all {len(urls)} shards "
                 f"(write one with: recipe-dist shards --manifest-only '{urls[0] if len(urls) == 1 else _split(urls[0])[0] + '/'}')")
    return count_samples(urls, on_corrupt), None
