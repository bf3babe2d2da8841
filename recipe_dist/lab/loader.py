"""`recipe-dist bench loader`: shard-loader throughput, object storage against local files.

Reads the same shards through the trainer's own pipeline (shard list, split, tar read, decode,
seeded shuffle, batch; no tokenization) from local files and from object storage, and prints
samples/s for each and their ratio. `--run RUN_DIR` adds the data wait of a real run, read
back from its TensorBoard files (`train/data_wait_fraction`).

  recipe-dist bench loader --local 'shards/aux-{000000..000007}.tar' --remote 's3://bucket/aux/'
  recipe-dist bench loader --moto                    # synthetic shards, a moto S3 server on loopback
  recipe-dist bench loader --local 'shards/*.tar' --moto --run runs/purify
  recipe-dist bench loader --moto --train --latency-ms 20 --startup 2000 --json loader.json

--train trains the tiny config from the local shards and from the same shards on S3 and reports
each run's median train/data_wait_fraction ({"runs": {"local": {"data_wait_fraction": x}, "s3":
{...}}}); --latency-ms adds a proxy delaying every S3 request, with prefetch off and on.
--startup N times listing, counting and the first batch of N tiny shards with and without their
manifest.

--moto starts a moto S3 server on a free loopback port (pip install "moto[server]"), uploads
the local shards into it and reads them back over HTTP: it measures the S3 client path
(signing, ranged GETs, retries), not a real network.
"""

from __future__ import annotations


import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ..data import storage
from ..data.pipeline import count_samples, epoch_stream, rank_micro_batches, shard_urls
from ..errors import RecipeError
from . import write_json


def _identity(sample: dict) -> dict:
    return sample


def measure(urls: list[str], passes: int, micro_batch: int, workers: int, text_key: str = "txt") -> dict:
    """Samples/s and text MB/s of full passes over `urls` (median over passes)."""
    n = count_samples(urls)
    quota = n // micro_batch
    if quota == 0:
        raise RecipeError(f"bench loader: {n} samples are fewer than one micro-batch of {micro_batch}")
    before = storage.counts()["retries"]
    rates, mbs = [], []
    for epoch in range(passes):
        def make_stream(ep: int):
            return epoch_stream(urls, ep, 0, text_key, _identity, micro_batch, 1000)

        t0 = time.perf_counter()
        samples = nbytes = 0
        for batch in rank_micro_batches(make_stream, epoch, quota, workers):
            samples += len(batch)
            nbytes += sum(len(s["text"].encode()) for s in batch)
        dt = time.perf_counter() - t0
        rates.append(samples / dt)
        mbs.append(nbytes / dt / 1e6)
    return {
        "shards": len(urls),
        "samples": quota * micro_batch,
        "samples_per_second": statistics.median(rates),
        "text_mb_per_second": statistics.median(mbs),
        "passes": [round(r, 1) for r in rates],
        "retries": storage.counts()["retries"] - before,
    }


def _synthetic_shards(root: Path, n: int) -> str:
    from ..data import synthetic
    from ..data.shards import brace_pattern, write_shards

    texts = synthetic.corpus(n, seed=0)
    prefix = str(root / "aux")
    urls = write_shards(({"text": t} for t in texts), prefix, math.ceil(n / 8), key_prefix="synthetic-")
    return brace_pattern(urls, prefix)


def _start_moto():
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise RecipeError('bench loader --moto needs moto\'s server: pip install "moto[server]"') from None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto accepts any credentials; these keep botocore from looking further (no real key is used).
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(k, v)
    return server, f"http://127.0.0.1:{port}"


def _data_wait(run_dir: Path) -> dict:
    from ..metrics import read_scalars

    scalars = read_scalars(run_dir / "tb")
    wait = [v for _, v in scalars.get("train/data_wait_fraction", [])]
    if not wait:
        raise RecipeError(f"--run {run_dir}: no train/data_wait_fraction in {run_dir / 'tb'}")
    retries = scalars.get("data/retries", [(0, 0.0)])[-1][1]
    return {"data_wait_fraction_median": statistics.median(wait), "data_wait_fraction_max": max(wait), "log_points": len(wait), "retries": retries}


def _upload(local_urls: list[str], prefix: str, with_manifest: bool = True) -> None:
    """Copy local shards (and their manifest) under the S3 `prefix` (ending in /)."""
    from ..data.manifest import MANIFEST

    fs, _ = storage.filesystem(prefix)
    bucket = prefix.split("://", 1)[1].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for u in local_urls:
        storage.upload(u, f"{prefix}{Path(u).name}")
    manifest_file = Path(local_urls[0]).parent / MANIFEST
    if with_manifest and manifest_file.is_file():
        storage.upload(str(manifest_file), prefix + MANIFEST)


def startup(n_shards: int, per_shard: int, root: Path) -> dict:
    """Seconds to list, count and read the first micro-batch of `n_shards` tiny shards on moto S3,
    with the manifest and without it (every shard read to count)."""
    from ..data import manifest, synthetic
    from ..data.manifest import MANIFEST
    from ..data.shards import write_shards

    texts = synthetic.corpus(n_shards * per_shard, seed=1)
    local = write_shards(({"text": t} for t in texts), str(root / "many" / "aux"), per_shard, key_prefix="m-")
    prefix = "s3://recipe-dist-bench/many/"
    _upload(local, prefix)
    out = {}
    for case in ("manifest", "no_manifest"):
        if case == "no_manifest":
            fs, path = storage.filesystem(prefix + MANIFEST)
            fs.rm(path)
        t0 = time.perf_counter()
        urls = shard_urls(prefix)
        t_list = time.perf_counter() - t0
        total, _ = manifest.counts(urls)
        t_count = time.perf_counter() - t0
        first = next(iter(epoch_stream(urls, 0, 0, "txt", _identity, 32, 64)))
        t_first = time.perf_counter() - t0
        assert total == len(texts) and len(first) == 32
        out[case] = {"list_s": round(t_list, 3), "list_and_count_s": round(t_count, 3), "to_first_batch_s": round(t_first, 3)}
    out["shards"], out["samples"] = n_shards, len(texts)
    out["no_manifest_over_manifest"] = out["no_manifest"]["to_first_batch_s"] / out["manifest"]["to_first_batch_s"]
    return out


def train_runs(local: str, remote: str, endpoint: str, steps: int, latency_ms: float, root: Path, workers: int = 0) -> dict:
    """The tiny config trained from local shards and from the same shards in S3 (and, with
    `latency_ms`, through a proxy adding that much per request, prefetch off and on); each run's
    median train/data_wait_fraction."""
    import subprocess

    from .fault_proxy import FaultProxy

    def run(name: str, urls: str, env_endpoint: str | None, prefetch: int) -> dict:
        out = root / f"train-{name}"
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        if env_endpoint:
            env["AWS_ENDPOINT_URL"] = env_endpoint
        # configs/tiny-bert.yaml's values, spelled out: the installed package has no configs/.
        cmd = [sys.executable, "-m", "recipe_dist", "purify", "--output_dir", str(out), "--data.train_urls", urls,
               "--model.tiny.hidden_size=64", "--model.tiny.num_hidden_layers=2", "--model.tiny.intermediate_size=128",
               "--data.max_length=32", "--data.shuffle_buffer=256", f"--data.num_workers={workers}", "--optim.lr=1e-3",
               "--train.micro_batch_size=16", "--train.global_batch_size=32", f"--train.max_steps={steps}", "--train.log_every=5",
               f"--data.prefetch_shards={prefetch}", "--checkpoint.every_steps=100000"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RecipeError(f"bench loader --train: the {name} run failed: {proc.stderr.strip().splitlines()[-1:]}")
        wait = _data_wait(out)
        print(f"train {name:<28} data_wait_fraction median {wait['data_wait_fraction_median']:.4f}", flush=True)
        return {"data_wait_fraction": wait["data_wait_fraction_median"], **wait, "prefetch_shards": prefetch}

    runs = {"local": run("local", local, None, 1), "s3": run("s3", remote, endpoint, 1)}
    if latency_ms:
        port = int(endpoint.rsplit(":", 1)[1])
        proxy = FaultProxy(port, rate=0.0, latency_s=latency_ms / 1000)
        try:
            for prefetch in (0, 1):
                runs[f"s3+{latency_ms:g}ms/prefetch{prefetch}"] = run(f"s3+{latency_ms:g}ms/prefetch{prefetch}".replace("/", "-"),
                                                                      remote, proxy.endpoint, prefetch)
        finally:
            proxy.close()
    return runs


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench loader", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", default="", help="local shards (brace pattern, dir/ or glob); default: synthetic shards in a temporary directory")
    ap.add_argument("--remote", default="", help="the same shards in object storage (s3://..., gs://...)")
    ap.add_argument("--endpoint-url", default="", help="S3-compatible endpoint for --remote (default: AWS_ENDPOINT_URL or AWS)")
    ap.add_argument("--moto", action="store_true", help="upload --local to a moto S3 server on loopback and use it as --remote")
    ap.add_argument("--samples", type=int, default=20000, help="size of the synthetic corpus when --local is not given")
    ap.add_argument("--passes", type=int, default=3, help="full passes per source; the median is reported")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--run", default="", help="a purify/attack run directory: report its train/data_wait_fraction")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    ap.add_argument("--train", action="store_true", help="also train the tiny config from the local and the S3 shards and report "
                    "each run's median train/data_wait_fraction (needs --moto or --remote)")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="with --train --moto: also train through a proxy adding this much "
                    "per S3 request, prefetch off and on")
    ap.add_argument("--startup", type=int, default=0, metavar="N", help="with --moto: time to the first batch from N tiny shards "
                    "with their manifest and without it")
    args = ap.parse_args(argv)
    if (args.train or args.startup) and not (args.moto or args.remote):
        raise RecipeError("bench loader: --train and --startup read from object storage: add --moto (or --remote)")
    if args.remote and args.moto:
        raise RecipeError("bench loader: give --remote or --moto, not both")

    with tempfile.TemporaryDirectory(prefix="recipe-dist-bench-") as tmp:
        local = args.local or _synthetic_shards(Path(tmp), args.samples)
        local_urls = shard_urls(local)
        server = None
        endpoint = args.endpoint_url
        remote = args.remote
        try:
            if args.moto:
                server, endpoint = _start_moto()
                storage.configure(storage.StorageOptions(endpoint_url=endpoint))
                remote = "s3://recipe-dist-bench/aux/"
                _upload(local_urls, remote)
            storage.configure(storage.StorageOptions(endpoint_url=endpoint))
            results = {"local": {"spec": local, **measure(local_urls, args.passes, args.micro_batch, args.workers)}}
            if remote:
                results["remote"] = {"spec": remote, **measure(shard_urls(remote), args.passes, args.micro_batch, args.workers)}
            if args.train:
                results["runs"] = train_runs(local, remote, endpoint, args.train_steps, args.latency_ms if args.moto else 0.0, Path(tmp), args.workers)
            if args.startup:
                results["startup"] = startup(args.startup, 4, Path(tmp))
        finally:
            if server is not None:
                server.stop()
    if args.run:
        results["run"] = {"dir": args.run, **_data_wait(Path(args.run))}

    print(f"loader: {results['local']['samples']} samples in {results['local']['shards']} shards, micro-batch {args.micro_batch}, "
          f"{args.workers} workers, median of {args.passes} passes" + (" (S3: moto on loopback)" if args.moto else ""))
    print(f"{'source':<8} {'samples/s':>10} {'text MB/s':>10} {'retries':>8}  shards")
    for name in ("local", "remote"):
        if name in results:
            r = results[name]
            print(f"{name:<8} {r['samples_per_second']:>10.0f} {r['text_mb_per_second']:>10.2f} {r['retries']:>8}  {r['spec']}")
    if "remote" in results:
        ratio = results["remote"]["samples_per_second"] / results["local"]["samples_per_second"]
        results["remote_over_local"] = ratio
        print(f"remote / local: {ratio:.2f}")
    if "run" in results:
        r = results["run"]
        print(f"run {r['dir']}: train/data_wait_fraction median {r['data_wait_fraction_median']:.3f}, "
              f"max {r['data_wait_fraction_max']:.3f} over {r['log_points']} log steps; data/retries {r['retries']:.0f}")
    if "runs" in results:
        for name, r in results["runs"].items():
            print(f"{name:<26} train/data_wait_fraction median {r['data_wait_fraction']:.4f} (prefetch_shards={r['prefetch_shards']})")
    if "startup" in results:
        st = results["startup"]
        print(f"startup, {st['shards']} shards on S3: with manifest {st['manifest']['to_first_batch_s']:.2f} s to the first batch "
              f"(listing {st['manifest']['list_s']:.2f} s), without {st['no_manifest']['to_first_batch_s']:.2f} s "
              f"({st['no_manifest_over_manifest']:.1f}x)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
