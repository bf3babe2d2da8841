"""Shard assignment for thousands of ranks, checked without starting a process."""

import webdataset as wds

import pytest

from recipe_dist.data.pipeline import assign, assign_shards, shard_order
from recipe_dist.seeds import Stream, mix_seed


def test_shard_order_is_webdatasets_detshuffle_so_old_runs_keep_their_order():
    urls = [f"s{i:05d}.tar" for i in range(41)]
    for epoch in range(3):
        old = wds.DataPipeline(wds.SimpleShardList(urls), wds.detshuffle(bufsize=41, initial=41, seed=mix_seed(9, Stream.SHARD_ORDER), epoch=epoch - 1))
        assert [x["url"] for x in old] == shard_order(urls, 9, epoch)
    assert shard_order(urls, 9, 0) != shard_order(urls, 9, 1) and sorted(shard_order(urls, 9, 1)) == urls


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 64, 1000, 4096])
@pytest.mark.parametrize("workers", [1, 8])
def test_every_shard_once_per_epoch_and_readers_balanced_within_one(world_size, workers):
    n = world_size * workers * 2 + 5  # enough shards for every reader, not a multiple of them
    urls = [f"s{i:06d}.tar" for i in range(n)]
    for epoch in (0, 3):
        order = shard_order(urls, 1234, epoch)
        per_rank, per_reader, union = [], [], []
        for rank in range(world_size):
            mine = []
            for worker in range(workers):
                got = assign(order, rank, world_size, worker, workers)
                per_reader.append(len(got))
                mine += got
            per_rank.append(len(mine))
            union += mine
        assert sorted(union) == urls  # every shard, hence every sample, exactly once per epoch
        assert max(per_rank) - min(per_rank) <= 1 and max(per_reader) - min(per_reader) <= 1
    # The composed function is the same pure function of its six arguments.
    assert assign_shards(urls, 1234, 3, world_size - 1, world_size, workers - 1, workers) == \
        assign(shard_order(urls, 1234, 3), world_size - 1, world_size, workers - 1, workers)
