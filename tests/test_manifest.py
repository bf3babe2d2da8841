"""Shard manifests: written with the shards, rebuilt from existing ones, read instead of the
shards at start-up, and a shard that disagrees with its entry is corrupt."""

import json

import pytest

from conftest import run_cli
from recipe_dist.data import manifest, pipeline, storage
from recipe_dist.data.shards import write_shards
from recipe_dist.errors import RecipeError


@pytest.fixture()
def shard_set(tmp_path):
    urls = write_shards(({"text": f"sentence {i} of the set"} for i in range(53)), str(tmp_path / "s" / "aux"), 10, key_prefix="k")
    return tmp_path / "s", urls


def test_shards_writes_a_manifest_that_a_rescan_reproduces(shard_set):
    folder, urls = shard_set
    doc = json.loads((folder / "manifest.json").read_text())
    assert [e["url"] for e in doc["shards"]] == [f"aux-{i:06d}.tar" for i in range(6)]  # relative to the manifest
    assert [e["samples"] for e in doc["shards"]] == [10, 10, 10, 10, 10, 3]
    for entry, url in zip(doc["shards"], urls):
        scanned = manifest.scan_shard(url)
        assert (scanned.samples, scanned.bytes, scanned.sha256) == (entry["samples"], entry["bytes"], entry["sha256"])
    (folder / "manifest.json").unlink()
    run_cli(["shards", "--manifest-only", f"{folder}/"])
    assert json.loads((folder / "manifest.json").read_text()) == doc


def test_two_shard_sets_share_a_directory_manifest(shard_set):
    folder, urls = shard_set
    other = write_shards(({"text": f"other {i}"} for i in range(7)), str(folder / "more"), 5, key_prefix="m")
    total, entries = manifest.counts(urls + other)
    assert total == 60 and entries is not None


def test_counts_come_from_the_manifest_without_reading_a_shard(shard_set, monkeypatch, capfd):
    folder, urls = shard_set

    def no_reading(*a, **k):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(pipeline, "shard_samples", no_reading)
    assert manifest.counts(urls)[0] == 53
    (folder / "manifest.json").unlink()
    with pytest.raises(AssertionError, match="a shard was read"):
        manifest.counts(urls)
    assert "recipe-dist shards --manifest-only" in capfd.readouterr().err


@pytest.mark.parametrize("field, value, why", [("samples", 9, "samples, but its manifest entry says 9"),
                                               ("bytes", 1234, "but its manifest entry says 1234")])
def test_a_shard_that_disagrees_with_its_entry_is_corrupt(shard_set, capfd, field, value, why):
    folder, urls = shard_set
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    doc["shards"][1][field] = value
    path.write_text(json.dumps(doc))
    entries = manifest.load(urls)
    with pytest.raises(storage.DataError, match=f"corrupt shard .*aux-000001.tar.*{why}"):
        list(pipeline.shard_samples(urls[1], "fail", expected=entries[urls[1]]))
    before = storage.counts()["corrupt_skipped"]
    kept = list(pipeline.shard_samples(urls[1], "skip", expected=entries[urls[1]]))
    assert storage.counts()["corrupt_skipped"] == before + 1 and "aux-000001.tar" in capfd.readouterr().err
    assert len(kept) < 10
    # The intact shards read in full under the same manifest.
    assert len(list(pipeline.shard_samples(urls[0], "fail", expected=entries[urls[0]]))) == 10


def test_a_damaged_manifest_is_one_line(shard_set):
    folder, urls = shard_set
    (folder / "manifest.json").write_text('{"version": 99, "shards": []}')
    with pytest.raises(RecipeError, match="manifest.json: not a recipe-dist shard manifest"):
        manifest.counts(urls)


@pytest.mark.slow  # a real CLI process: CI-only, to keep the fast lane under 2 minutes
def test_purify_on_shards_with_a_manifest_trains_on_every_sample(tmp_path, shard_set, tiny_bert_dir):
    folder, urls = shard_set
    out = tmp_path / "run"
    proc = run_cli(["purify", "--model.path", tiny_bert_dir, "--data.train_urls", f"{folder}/", "--output_dir", out,
                    "--train.global_batch_size=8", "--train.micro_batch_size=8", "--train.epochs=1", "--data.max_length=16",
                    "--data.record_keys=true", "--checkpoint.every_steps=100", "--data.shuffle_buffer=8"])
    assert "manifest" not in proc.stderr  # no warning: the counts came from it
    keys = [k for line in (out / "keys" / "rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]]
    assert len(keys) == 48 and len(set(keys)) == 48  # 6 steps of 8 of the 53 samples, none twice
