"""Object storage and faults, against real components started here.

- S3 is a moto server (ThreadedMotoServer) on a free loopback port, reached through s3fs with
  an endpoint URL, exactly as an S3-compatible store would be.
- Faults come from a small HTTP proxy on loopback in front of moto that answers some requests
  with 500 / 503, resets the connection before replying, or cuts a reply off mid-body.
- The CLI runs as a subprocess (`recipe-dist shards`, `recipe-dist purify`), as a user runs it.
"""

from __future__ import annotations

import json
import logging
import random
import urllib.request
from pathlib import Path

import pytest
import webdataset as wds

from conftest import REPO, free_port, run_cli
from recipe_dist import cli
from recipe_dist.config import ConfigError, load_config
from recipe_dist.data import storage, synthetic
from recipe_dist.data.pipeline import (
    DataError,
    check_shard_count,
    count_samples,
    epoch_stream,
    rank_micro_batches,
    shard_samples,
    shard_urls,
)
from recipe_dist.lab.fault_proxy import FaultProxy
from recipe_dist.metrics import read_scalars

TINY = REPO / "configs" / "tiny-bert.yaml"
BUCKET = "recipe-dist-test"
N_SAMPLES, PER_SHARD = 256, 16  # 16 shards
DUMMY_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# ------------------------------------------------------------------ components


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port; this process gets dummy credentials and its endpoint."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**DUMMY_CREDS, "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        storage.configure(storage.StorageOptions(endpoint_url=endpoint))
        yield {"endpoint": endpoint, "port": port, "env": env}
        storage.configure(storage.StorageOptions())
    server.stop()


def _moto_auth(endpoint: str, initial_no_auth_count: str) -> None:
    """Switch moto's request authentication on ("0": from the next request) or off ("inf")."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=initial_no_auth_count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory):
    """The same corpus as local shards and, through `recipe-dist shards`, as shards in the bucket."""
    root = tmp_path_factory.mktemp("storage")
    corpus = root / "aux.txt"
    corpus.write_text("".join(f"{t}\n" for t in synthetic.corpus(N_SAMPLES, seed=3)))
    local_prefix = root / "local" / "aux"
    assert cli.main(["shards", "--input", str(corpus), "--output", str(local_prefix), "--samples-per-shard", str(PER_SHARD)]) == 0
    proc = run_cli(["shards", "--input", corpus, "--output", f"s3://{BUCKET}/aux/shard", "--samples-per-shard", PER_SHARD], env=s3["env"])
    n = N_SAMPLES // PER_SHARD
    remote = f"s3://{BUCKET}/aux/shard-{{000000..{n - 1:06d}}}.tar"
    assert f"wrote {n} shards: {remote}" in proc.stdout
    return {"local": f"{local_prefix}-{{000000..{n - 1:06d}}}.tar", "remote": remote, "root": root, "n": n}


def _purify(urls: str, out: Path, model: Path, env=None, extra=(), check=True):
    return run_cli(
        ["purify", "--config", TINY, "--model.path", model, "--data.train_urls", urls, "--output_dir", out,
         "--train.max_steps=8", "--train.micro_batch_size=16", "--train.global_batch_size=16", "--train.log_every=2",
         "--data.num_workers=2", "--data.record_keys=true", "--checkpoint.every_steps=100", *extra],
        env=env, check=check, timeout=300,
    )


def _keys(run: Path) -> list[list[str]]:
    return [json.loads(line)["keys"] for line in (run / "keys" / "rank0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_run(shards, tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "local"
    _purify(shards["local"], out, tiny_bert_dir)
    return out


# ------------------------------------------------------------------ the storage object


def _flaky(failures: int):
    """A storage call that drops the connection `failures` times, then answers."""
    left = [failures]

    def fn():
        if left[0]:
            left[0] -= 1
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    return fn


def test_storage_objects_count_their_own_retries():
    a = storage.Storage(storage.StorageOptions(retries=3, retry_backoff=0.0))
    b = storage.Storage(storage.StorageOptions(retries=0, retry_backoff=0.0))
    before = storage.counts()
    assert a.call(_flaky(2), "s3://bucket/a.tar") == b"ok"
    assert a.counts() == {"retries": 2, "corrupt_skipped": 0}
    with pytest.raises(DataError, match=r"cannot read s3://bucket/b\.tar: ConnectionResetError.*gave up after 0 retries"):
        b.call(_flaky(1), "s3://bucket/b.tar")
    assert b.counts()["retries"] == 0
    assert storage.counts() == before  # the process default saw none of it
    # A worker's hand-over: take (and reset) on one side, add on the other.
    a.count("corrupt_skipped")
    delta = a.take_counts()
    assert delta == {"retries": 2, "corrupt_skipped": 1} and a.take_counts() == {}
    b.add_counts(delta)
    assert b.counts() == {"retries": 2, "corrupt_skipped": 1}


def test_module_functions_use_the_process_default(monkeypatch):
    monkeypatch.setattr(storage, "_default", storage.Storage())  # a fresh default for this test
    default = storage.default()
    storage.count("corrupt_skipped")
    assert default.counts() == storage.counts() == {"retries": 0, "corrupt_skipped": 1}
    storage.configure(storage.StorageOptions(retries=1, retry_backoff=0.0))
    assert default.options.retries == 1
    assert storage.call(_flaky(1), "s3://bucket/c.tar") == b"ok"
    assert storage.take_counts() == {"retries": 1, "corrupt_skipped": 1} and default.counts()["retries"] == 0


def test_a_forked_worker_starts_counting_from_zero(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(storage, "_default", storage.Storage())
    other = storage.Storage()
    storage.count("retries", 3)
    other.count("retries", 5)
    ctx = multiprocessing.get_context("fork")  # how DataLoader workers start on Linux
    got = ctx.SimpleQueue()
    child = ctx.Process(target=lambda: got.put((storage.counts()["retries"], other.counts()["retries"])))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and got.get() == (0, 0)  # the parent's counts are the parent's to report
    assert (storage.counts()["retries"], other.counts()["retries"]) == (3, 5)


# ------------------------------------------------------------------ writing, listing, reading


def test_shards_in_bucket_read_like_local_ones(s3, shards):
    local, remote = shard_urls(shards["local"]), shard_urls(shards["remote"])
    assert len(remote) == shards["n"] and remote[0] == f"s3://{BUCKET}/aux/shard-000000.tar"
    # Listing a prefix and a glob give the same, sorted.
    assert shard_urls(f"s3://{BUCKET}/aux/") == remote
    assert shard_urls(f"s3://{BUCKET}/aux/shard-*.tar") == remote
    assert shard_urls(f"s3://{BUCKET}/aux/shard-00000[0-3].tar") == remote[:4]
    assert shard_urls(f"{shards['root']}/local/") == local  # a local prefix lists the same way
    assert count_samples(remote) == count_samples(local) == N_SAMPLES
    # webdataset itself opens s3:// through the registered opener.
    got = {s["__key__"]: s["txt"] for s in wds.WebDataset(remote, shardshuffle=False)}
    want = {s["__key__"]: s["txt"] for s in wds.WebDataset(local, shardshuffle=False)}
    assert got == want and len(got) == N_SAMPLES
    with pytest.raises(DataError, match=f"no shards under s3://{BUCKET}/nothing/"):
        shard_urls(f"s3://{BUCKET}/nothing/")


def test_prefetch_reads_the_same_stream_whole_or_ranged(s3, shards):
    """Prefetching shards ahead (whole objects, or ranged reads for those over the size limit) gives
    the samples of reading without prefetch, in the same order; the bucket's manifest matches."""
    from recipe_dist.data import manifest
    from recipe_dist.data.pipeline import prefetched

    remote = shard_urls(shards["remote"])
    entries = manifest.load(remote)
    assert entries is not None and sum(e.samples for e in entries.values()) == N_SAMPLES  # written by `recipe-dist shards`

    def stream(**kw):
        return [[s["__key__"] for s in b] for b in epoch_stream(remote, 0, 7, "txt", lambda s: s, 8, 16, manifest=entries, **kw)]

    plain = stream(prefetch=0)
    assert stream(prefetch=2) == plain
    assert stream(prefetch=1, prefetch_max_bytes=1) == plain  # every shard over the limit: ranged reads
    # The prefetch thread fetched whole objects ahead, one per shard, in order.
    got = list(prefetched(iter(remote[:3]), 2, 1 << 30))
    assert [u for u, _ in got] == remote[:3] and all(hasattr(s, "getbuffer") for _, s in got)
    # A missing shard fails when its turn comes, with the error reading would give.
    with pytest.raises(DataError, match="shard-999999.tar"):
        list(prefetched(iter([remote[0], f"s3://{BUCKET}/aux/shard-999999.tar"]), 1, 1 << 30))


@pytest.mark.slow  # end-to-end: CI runs it, the fast lane leaves it out
def test_purify_from_s3_is_identical_to_local(s3, shards, local_run, tiny_bert_dir, tmp_path):
    out = tmp_path / "s3"
    _purify(shards["remote"], out, tiny_bert_dir, env=s3["env"])  # endpoint from AWS_ENDPOINT_URL
    assert (out / "model" / "model.safetensors").read_bytes() == (local_run / "model" / "model.safetensors").read_bytes()
    assert _keys(out) == _keys(local_run)
    scalars = read_scalars(out / "tb")
    assert [v for _, v in scalars["data/retries"]] == [0.0] * 4
    assert all(0.0 <= v <= 1.0 for _, v in scalars["train/data_wait_fraction"])


@pytest.mark.slow
def test_faults_are_retried_and_lose_or_repeat_no_sample(s3, shards, local_run, tiny_bert_dir, tmp_path):
    seed = 7
    # The seed's first 60 draws hold a 500 or 503: a retry the run must count (a reset can be
    # replayed invisibly by aiohttp on a reused keep-alive connection, as RFC 9112 allows).
    rng = random.Random(seed)
    draws = [(rng.random() < 0.05) and rng.choice(FaultProxy.KINDS) for _ in range(60)]
    assert {"500", "503"} & set(draws)
    proxy = FaultProxy(s3["port"], rate=0.05, seed=seed)
    try:
        out = tmp_path / "faulty"
        _purify(shards["remote"], out, tiny_bert_dir, env=s3["env"],
                extra=[f"--data.endpoint_url={proxy.endpoint}", "--data.retry_backoff=0.05"])
    finally:
        proxy.close()
    injected = sum(proxy.faults.values())
    assert injected >= 2, proxy.faults
    keys = _keys(out)
    flat = [k for batch in keys for k in batch]
    assert len(flat) == len(set(flat)) == 8 * 16  # nothing repeated
    assert keys == _keys(local_run)  # nothing lost, same order
    assert (out / "model" / "model.safetensors").read_bytes() == (local_run / "model" / "model.safetensors").read_bytes()
    retries = read_scalars(out / "tb")["data/retries"][-1][1]
    assert 1 <= retries <= injected, (retries, proxy.faults)


def test_every_fault_kind_is_survived_and_counted(s3, shards):
    proxy = FaultProxy(s3["port"], rate=0.3, seed=1)
    remote = shard_urls(shards["remote"])
    want = {u: [s["__key__"] for s in shard_samples(u)] for u in shard_urls(shards["local"])}
    try:
        storage.configure(storage.StorageOptions(endpoint_url=proxy.endpoint, retries=10, retry_backoff=0.01))
        before = storage.counts()["retries"]
        for _ in range(2):
            got = [[s["__key__"] for s in shard_samples(u)] for u in remote]
            assert got == list(want.values())
        retries = storage.counts()["retries"] - before
    finally:
        storage.configure(storage.StorageOptions(endpoint_url=s3["endpoint"]))
        proxy.close()
    assert all(proxy.faults.values()), proxy.faults
    # 500, 503 and cut replies always reach us; a reset may be replayed by aiohttp itself.
    assert proxy.faults["500"] + proxy.faults["503"] + proxy.faults["cut"] <= retries <= sum(proxy.faults.values())


# ------------------------------------------------------------------ corrupt shards


def _truncated_copies(shards, root: Path) -> tuple[str, str]:
    data = Path(shard_urls(shards["local"])[0]).read_bytes()
    mid = root / "mid.tar"  # cut inside a member: tarfile raises
    mid.write_bytes(data[: len(data) // 3 + 100])
    boundary = root / "boundary.tar"  # cut at a member boundary: tarfile alone would read a clean end
    boundary.write_bytes(data[:2048])
    return str(mid), str(boundary)


def test_truncated_shard_fails_or_is_skipped_with_a_counted_warning(shards, tmp_path, capfd):
    for bad in _truncated_copies(shards, tmp_path):
        with pytest.raises(DataError, match=f"corrupt shard {bad}: "):
            count_samples([bad])
        before = storage.counts()["corrupt_skipped"]
        kept = [s["__key__"] for s in shard_samples(bad, on_corrupt="skip")]
        assert storage.counts()["corrupt_skipped"] == before + 1
        full = [s["__key__"] for s in shard_samples(shard_urls(shards["local"])[0])]
        assert kept == full[: len(kept)] and len(kept) < len(full)
        err = capfd.readouterr().err
        assert f"recipe-dist: warning: corrupt shard {bad}:" in err and f"after {len(kept)} samples" in err
    # Through the whole pipeline: the good shard's samples all come, the bad one's rest does not.
    good = shard_urls(shards["local"])[1]
    batches = list(epoch_stream([bad, good], 0, 0, "txt", lambda s: s, 1, 4, on_corrupt="skip"))
    assert len(batches) == len(kept) + PER_SHARD


def test_error_in_a_dataloader_worker_arrives_as_one_line(shards, tmp_path):
    mid, _ = _truncated_copies(shards, tmp_path)
    good = shard_urls(shards["local"])[1]

    def make_stream(epoch):
        return epoch_stream([mid, good], epoch, 0, "txt", lambda s: s, 2, 4)

    with pytest.raises(DataError) as ei:
        list(rank_micro_batches(make_stream, 0, 100, num_workers=2))
    assert str(ei.value).startswith(f"corrupt shard {mid}: ") and "\n" not in str(ei.value)


# ------------------------------------------------------------------ bad input: one line, exit 2, no secret


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("recipe-dist: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


@pytest.mark.slow  # end-to-end CLI runs: CI runs them, the fast lane leaves them out
@pytest.mark.parametrize("case", ["missing-bucket", "missing-key", "truncated"])
def test_bad_input_is_one_line_naming_the_url(case, s3, shards, tiny_bert_dir, tmp_path):
    if case == "missing-bucket":
        spec, named = "s3://no-such-bucket-1/aux/shard-{000000..000001}.tar", "s3://no-such-bucket-1/aux/shard-000000.tar"
    elif case == "missing-key":
        spec, named = f"s3://{BUCKET}/aux/missing-{{000000..000001}}.tar", f"s3://{BUCKET}/aux/missing-000000.tar"
    else:
        mid, _ = _truncated_copies(shards, tmp_path)
        named = f"s3://{BUCKET}/truncated/shard-000000.tar"
        storage.upload(mid, named)
        storage.upload(shard_urls(shards["local"])[1], f"s3://{BUCKET}/truncated/shard-000001.tar")
        spec = f"s3://{BUCKET}/truncated/"
    line = _one_error_line(_purify(spec, tmp_path / "run", tiny_bert_dir, env=s3["env"], check=False))
    assert named in line
    assert {"missing-bucket": "NoSuchBucket", "missing-key": "not found", "truncated": "corrupt shard"}[case] in line


@pytest.mark.slow  # an end-to-end CLI run
def test_wrong_credentials_is_one_line_without_the_secret(s3, shards, tiny_bert_dir, tmp_path):
    # moto accepts any key until authentication is switched on; with it on, a key id that no
    # IAM user holds is refused with 403 (InvalidAccessKeyId), as AWS refuses a wrong key.
    secret = "wrong-SECRET-value-1234567890"
    env = {**s3["env"], "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY00000000", "AWS_SECRET_ACCESS_KEY": secret}
    _moto_auth(s3["endpoint"], "0")
    try:
        proc = _purify(shards["remote"], tmp_path / "run", tiny_bert_dir, env=env, check=False)
    finally:
        _moto_auth(s3["endpoint"], "inf")
    line = _one_error_line(proc)
    assert f"s3://{BUCKET}/aux/shard-000000.tar" in line and "access denied" in line
    assert secret not in proc.stderr + proc.stdout
    assert secret not in (tmp_path / "run" / "config.yaml").read_text()


def test_secrets_stay_out_of_config_and_messages(monkeypatch):
    with pytest.raises(ConfigError, match="must not carry credentials"):
        load_config(str(TINY), ["--data.endpoint_url=http://AKIA123:hunter22@minio:9000"])
    with pytest.raises(ConfigError, match="data.on_corrupt"):
        load_config(str(TINY), ["--data.on_corrupt=ignore"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter22-secret")
    assert storage.redact("signature for hunter22-secret\nfailed") == "signature for *** failed"


# ------------------------------------------------------------------ shard count, resampling


def test_too_few_shards_is_an_error_unless_resampled(shards):
    with pytest.raises(DataError, match="3 shards cannot feed 2 ranks x 2 workers.*data.resampled=true"):
        check_shard_count(3, 2, 2, resampled=False)
    check_shard_count(3, 2, 2, resampled=True)
    check_shard_count(4, 2, 2, resampled=False)

    one = shard_urls(shards["local"])[:2]

    def keys(epoch, n=40):
        stream = iter(epoch_stream(one, epoch, 5, "txt", lambda s: s, 1, 8, resampled=True))
        return [next(stream)[0]["__key__"] for _ in range(n)]

    assert keys(0) == keys(0) != keys(1)  # endless, seeded by (seed, epoch, rank, worker)
    assert len(set(keys(0))) <= 2 * PER_SHARD


# ------------------------------------------------------------------ loader benchmark


@pytest.mark.slow  # a real CLI process: CI-only, to keep the fast lane under 2 minutes
def test_bench_loader_against_moto(s3, shards, local_run, capsys):
    rc = cli.main(["bench", "loader", "--local", shards["local"], "--remote", f"s3://{BUCKET}/aux/",
                   "--endpoint-url", s3["endpoint"], "--passes", "1", "--run", str(local_run)])
    out = capsys.readouterr().out
    assert rc == 0, out
    print(out)  # the figures, for the log; they are not asserted
    for needle in ("local", "remote", "samples/s", "remote / local:", "train/data_wait_fraction median"):
        assert needle in out


@pytest.mark.slow
def test_bench_loader_trains_from_local_and_s3_with_latency_and_times_startup(tmp_path):
    """`bench loader --moto --train --latency-ms --startup`: every run and both start-up cases are
    measured and written; the figures themselves are not asserted (timings never are)."""
    target = tmp_path / "loader.json"
    proc = run_cli(["bench", "loader", "--moto", "--samples", "640", "--passes", "1", "--train", "--train-steps", "10",
                    "--latency-ms", "5", "--startup", "24", "--json", target], timeout=900)
    result = json.loads(target.read_text())
    assert set(result["runs"]) == {"local", "s3", "s3+5ms/prefetch0", "s3+5ms/prefetch1"}
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in result["runs"].values())
    assert result["runs"]["s3+5ms/prefetch0"]["prefetch_shards"] == 0 and result["runs"]["s3"]["prefetch_shards"] == 1
    st = result["startup"]
    assert st["shards"] == 24 and {"manifest", "no_manifest"} <= set(st) and "without" in proc.stdout
