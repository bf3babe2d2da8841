"""Named random streams.

Every random choice in a run is drawn from its own stream, seeded from (train.seed or
attack.seed, the stream's number, and coordinates such as epoch, rank or sample key). Distinct
streams never share draws, so changing one (say, the number of DataLoader workers) leaves every
other stream, and therefore the rest of the run, unchanged. The numbers are part of the on-disk
contract: a resumed run must draw the same values as the run that wrote the checkpoint, so a
stream's number never changes once released.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum


class Stream(IntEnum):
    SHARD_ORDER = 0  # per-epoch shard shuffle (webdataset detshuffle)
    SAMPLE_SHUFFLE = 1  # per-epoch sample shuffle buffer
    DYNAMIC_MASK = 2  # masked-LM masks drawn per micro-batch in collate
    LOADER_WORKERS = 3  # DataLoader worker seeds (never the global torch RNG)
    RESAMPLED_SHARDS = 4  # shards drawn with replacement (data.resampled)
    TORCH_GLOBAL = 5  # the global torch RNG (dropout), per rank, and again after a resume
    STATIC_MASK = 7  # one mask per sample key for the whole run (data.masking=static)
    POR_TRIGGER = 11  # POR: which trigger a sample gets, and where
    NEUBA_TARGET = 13  # NeuBA: which target vector a sample gets
    BADPRE_TRIGGER = 17  # BadPre: which trigger a sample gets, and where
    BADPRE_LABELS = 19  # BadPre: the random labels of poisoned masked positions
    CAUSAL_TRIGGER = 23  # decoder lab: which samples are poisoned, and where the trigger goes
    IMAGE_AUGMENT = 29  # image families: the training transform's random crop and flip, per (epoch, sample key)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several ints; distinct tuples give unrelated streams."""
    h = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def key_seed(seed: int, stream: int, key: str) -> int:
    """A seed for one sample, from its whole `__key__` (stable across runs, ranks and workers)."""
    h = hashlib.blake2b(f"{int(seed)}:{int(stream)}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)
