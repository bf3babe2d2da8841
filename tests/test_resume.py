"""Checkpoints under failure, through the real CLI and launch script on 2 gloo ranks.

- kill -9 of every process of a 2-rank run at several steps (one mid-interval, one at a
  checkpoint, one inside a save), then `--resume auto`: final weights and the consumed sample
  keys are bit-identical to an uninterrupted run;
- a full disk during a save: one clear error, the previous checkpoint intact, and a later
  resume finishes bit-identical;
- a 2-rank checkpoint resumed on 1 rank (DeepSpeed universal checkpoint) holds the guarantee
  documented in `recipe_dist.checkpoint.WORLD_SIZE_CHANGE`.
"""

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, wait_until_stopped
from recipe_dist import checkpoint as ckpt

pytestmark = pytest.mark.slow  # multi-process or end-to-end: outside the fast lane (pytest -m "not slow")

TINY = REPO / "configs" / "tiny-bert.yaml"
STEPS = 36  # 24 steps per epoch: the run crosses an epoch boundary
COMMON = [
    "purify", "--config", TINY, "--model.tiny.hidden_size=32", "--model.tiny.intermediate_size=64",
    "--data.synthetic_samples=384", "--train.micro_batch_size=8", "--train.global_batch_size=16",
    "--train.zero_stage=1", "--data.num_workers=1", "--data.record_keys=true", "--checkpoint.every_steps=2",
    f"--train.max_steps={STEPS}", "--train.log_every=1",
]


# ------------------------------------------------------------------ helpers


def keys(out: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted((out / "keys").glob("rank*.jsonl"))}


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert x.keys() == y.keys()
    changed = [k for k in x if not torch.equal(x[k], y[k])]
    assert not changed, changed


def recorded_step(out: Path) -> int:
    """The newest step rank 0 has started consuming data for (0 if none)."""
    try:
        lines = (out / "keys" / "rank0.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(ln)["step"] for ln in lines if ln.endswith("}")), default=0)


def _tree(pid: int) -> set[int]:
    """`pid` and its descendants. torchrun starts each worker in a session of its own, so a
    process-group kill would miss them: walk the parent links instead."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def _signal(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class Run:
    """A 2-rank `launch/local.sh` run in the background that the test can freeze and kill -9."""

    def __init__(self, out: Path, *extra):
        self.out = out
        self.log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w+")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(["bash", str(REPO / "launch" / "local.sh"), "2", *map(str, COMMON), "--output_dir", str(out), *extra],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.frozen: set[int] = set()

    def freeze(self) -> None:
        """SIGSTOP the launcher and every descendant (repeated until no new process appears), and
        return only once every thread of theirs has stopped: kill() returns before the stop lands,
        and a save could still finish in that window."""
        while True:
            new = _tree(self.proc.pid) - self.frozen
            if not new:
                break
            _signal(new, signal.SIGSTOP)
            self.frozen |= new
        wait_until_stopped(self.frozen)

    def thaw(self) -> None:
        _signal(self.frozen, signal.SIGCONT)
        self.frozen = set()

    def kill9(self) -> None:
        """Every process of the job dies at once, as on a node failure."""
        self.freeze()
        _signal(self.frozen, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def wait_for(self, condition, timeout: float = 300) -> None:
        t0 = time.time()
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before the kill point:\n{self.output()[-4000:]}")
            if time.time() - t0 > timeout:
                self.kill9()
                raise AssertionError("kill point not reached in time")
            time.sleep(0.002)

    def finish(self, timeout: float = 300) -> str:
        self.proc.wait(timeout=timeout)
        out = self.output()
        assert self.proc.returncode == 0, out[-4000:]
        return out

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


def resumed_from(text: str) -> int:
    line = next(ln for ln in text.splitlines() if ln.startswith("resumed from "))
    return int(line.rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run; keep=100 leaves every checkpoint for the tests to start from."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_cli([*COMMON, "--output_dir", out, "--checkpoint.keep=100"], nproc=2)
    return out


# ------------------------------------------------------------------ tests


def test_kill9_at_several_steps_resumes_bit_identical(straight, tmp_path):
    out = tmp_path / "crash"
    root = out / "checkpoints"
    resumes = []

    # 1. Mid-interval, epoch 0: killed while step 5 trains, after checkpoint 4.
    run = Run(out)
    run.wait_for(lambda: recorded_step(out) >= 5)
    run.kill9()
    newest = ckpt.complete_tags(root)[0][0]
    assert recorded_step(out) > newest, "the kill should land after the newest checkpoint (work to roll back)"

    # 2. Right after checkpoint 14 is declared complete, epoch 0.
    run = Run(out, "--resume", "auto")
    run.wait_for(lambda: (root / ckpt.tag_for(14) / ckpt.COMPLETE).is_file())
    run.kill9()
    resumes.append(resumed_from(run.output()))

    # 3. Inside a save in epoch 1: frozen while a .partial directory exists, then killed.
    run = Run(out, "--resume", "auto")
    killed_in = None
    while killed_in is None:
        run.wait_for(lambda: any(d.endswith(ckpt.PARTIAL) and int(d[5:13]) >= 28 for d in os.listdir(root)))
        run.freeze()
        partial = [d for d in os.listdir(root) if d.endswith(ckpt.PARTIAL) and int(d[5:13]) >= 28]
        if partial:  # still being written: DeepSpeed's files are (partly) there, COMPLETE is not
            killed_in = int(partial[0][5:13])
            run.kill9()
        else:  # the save finished between poll and freeze: try the next one
            assert int(ckpt.find_resume(root)[5:]) < STEPS - 2, "no save could be caught in progress"
            run.thaw()
    resumes.append(resumed_from(run.output()))
    assert not (root / ckpt.tag_for(killed_in)).exists()
    assert ckpt.find_resume(root) == ckpt.tag_for(killed_in - 2)

    # 4. To the end; the interrupted save is ignored and cleaned up.
    final = Run(out, "--resume", "auto").finish()
    resumes.append(resumed_from(final))
    assert resumes[-1] == killed_in - 2, "resume must use the complete checkpoint before the killed save"
    assert len(set(resumes)) == 3 and resumes[0] < 24 < resumes[-1], resumes
    assert not [d for d in os.listdir(root) if ckpt.GARBAGE_RE.match(d)]
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS

    print(f"kill -9 while step {newest + 1}+ trained, right after checkpoint 14, inside save {killed_in}; resumed from {resumes}")
    assert_same_weights(straight, out)
    # The sample keys of every step the final model incorporates, per rank, in order.
    assert keys(out) == keys(straight)


def _processes_writing(out: Path) -> list[int]:
    """Pids whose command line names run directory `out` (the ranks carry it as --output_dir)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmd:
                found.append(int(d))
    return found


def test_kill9_of_the_launchers_process_group_leaves_no_rank_behind(straight, tmp_path):
    out = tmp_path / "orphans"
    run = Run(out)
    run.wait_for(lambda: recorded_step(out) >= 5)
    ranks = _processes_writing(out)
    assert len(ranks) >= 3, ranks  # the launcher and its two ranks
    os.killpg(run.proc.pid, signal.SIGKILL)  # what `kill -9 -PGID` of launch/local.sh does; the ranks are not in it
    run.proc.wait(timeout=30)
    deadline = time.time() + 30
    while _processes_writing(out) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_writing(out), "ranks outlived their launcher"
    final = Run(out, "--resume", "auto").finish()  # the lock died with them: resume is not refused
    assert resumed_from(final) >= 4
    assert_same_weights(straight, out)


def _try_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


def test_full_disk_during_save_keeps_previous_checkpoint(straight, tmp_path):
    out = tmp_path / "full"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("model", "summary.json", "checkpoints"))
    root = out / "checkpoints"
    # A real full device where mount is permitted (root, as on this project's CI); elsewhere a
    # torch.save that fails with ENOSPC. The test says which one ran (-rA / the junit output).
    mounted = _try_tmpfs(root, "8m")
    print(f"full disk: {'a real 8 MiB tmpfs' if mounted else 'SIMULATED (no mount permission): torch.save raising ENOSPC'}")
    if not mounted and os.geteuid() == 0:
        pytest.fail("running as root but a tmpfs could not be mounted: the real full-disk path did not run")
    try:
        shutil.copytree(straight / "checkpoints" / ckpt.tag_for(10), root / ckpt.tag_for(10))
        before = {p.name: p.read_bytes() for p in (root / ckpt.tag_for(10)).iterdir()}
        if mounted:
            filler = root / "filler"
            with open(filler, "wb") as f:  # leave 32 KiB: the next checkpoint (~250 KiB) cannot fit
                f.write(b"\0" * (shutil.disk_usage(root).free - (32 << 10)))
            cmd = ["bash", str(REPO / "launch" / "local.sh"), "2"]
        else:  # no mount permission: torch.save fails as on a full disk, inside checkpoint .partial dirs only
            cmd = ["torchrun", "--standalone", "--nproc_per_node=2", str(Path(__file__).with_name("fail_save_enospc.py"))]
        proc = subprocess.run([*cmd, *map(str, COMMON), "--output_dir", str(out), "--resume", "auto"],
                              cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("recipe-dist: error:")]
        assert errors, proc.stderr[-4000:]
        assert f"checkpoint {ckpt.tag_for(12)} was not saved" in errors[0] and "no space left on device" in errors[0], errors[0]
        assert f"the previous complete checkpoint {root / ckpt.tag_for(10)} is intact" in errors[0], errors[0]
        # Every rank left through the one-line error (exit 2), none hung; the launcher names the first.
        if mounted:
            assert proc.returncode == 2 and "exited with code 2 (its message is above)" in proc.stderr, proc.stderr[-2000:]
        else:
            assert "exitcode  : 2" in proc.stderr  # raw torchrun's failure table
        # The previous checkpoint is untouched and still the one to resume; nothing partial is left.
        assert {p.name: p.read_bytes() for p in (root / ckpt.tag_for(10)).iterdir()} == before
        assert ckpt.find_resume(root) == ckpt.tag_for(10)
        assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == [ckpt.tag_for(10)]

        if mounted:
            filler.unlink()
        final = run_cli([*COMMON, "--output_dir", out, "--resume", "auto"], nproc=2).stdout
        assert resumed_from(final) == 10
        assert_same_weights(straight, out)
        assert keys(out) == keys(straight)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)


def test_world_size_change_2_to_1(straight, tmp_path):
    from recipe_dist.data.pipeline import epoch_stream, shard_urls
    from recipe_dist.metrics import read_scalars

    src = straight / "checkpoints" / ckpt.tag_for(10)  # mid-epoch 0 of 24 steps
    out = tmp_path / "one"
    args = [*COMMON, "--output_dir", out, "--resume", src]

    # A different global batch would shift the data position and schedule: refused, one line.
    bad = run_cli([*args, "--train.global_batch_size=32"], check=False)
    assert bad.returncode == 2
    assert "train.global_batch_size is 32 but" in bad.stderr and "written with 16" in bad.stderr, bad.stderr[-2000:]

    proc = run_cli(args)  # 1 rank: accumulation 2 keeps the global batch of 16
    assert resumed_from(proc.stdout) == 10
    assert "checkpoint written by 2 rank(s), continuing on 1 (universal checkpoint) mid-epoch: the rest of epoch 0 is exactly" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["samples"] == STEPS * 16 and summary["world_size"] == 1
    meta = ckpt.read_meta(out / "checkpoints" / ckpt.tag_for(STEPS))
    assert meta["world_size"] == 1 and meta["data"]["epoch"] == 1 and meta["data"]["samples_in_epoch"] == 12 * 16

    # Model, optimizer and schedule continue: step 11 starts from exactly the weights of step 10
    # (its forward norms equal the 2-rank run's), and the learning rate matches at every step.
    a, b = read_scalars(straight / "tb"), read_scalars(out / "tb")
    norms = [t for t in a if t.startswith("reg/norm/")]
    assert norms and all(dict(a[t])[11] == dict(b[t])[11] for t in norms)
    assert [v for s, v in a["train/lr"] if s > 10] == pytest.approx([v for s, v in b["train/lr"] if s > 10], rel=1e-12)

    # Data: every step takes 16 samples. The rest of epoch 0 is exact: each step's global batch is
    # the 2-rank run's, so over the whole run every sample of the epoch is read once, none twice.
    recs = keys(out)["rank0.jsonl"]
    assert [r["step"] for r in recs] == [s for s in range(11, STEPS + 1) for _ in range(2)]
    assert all(len(r["keys"]) == 8 for r in recs)
    assert_exact_epoch(keys(straight), keys(out), resumed_at=10, steps_per_epoch=24)
    # Epoch 1 is exactly what a 1-rank run reads (a pure function of seed, epoch and world size).
    urls = shard_urls(str(out / "data" / "synthetic-{000000..000007}.tar"))
    expected = [s["__key__"] for batch in epoch_stream(urls, 1, 42, "txt", lambda s: s, 8, 256) for s in batch]
    got = [k for r in recs if r["epoch"] == 1 for k in r["keys"]]
    assert got == expected[: len(got)] and len(got) == 12 * 16


def test_zero_stage_changes_in_every_direction_continue_the_run(straight, tmp_path):
    """A ZeRO-1 checkpoint (2 ranks, mid-epoch) resumed under ZeRO 0, 2 and 3, and checkpoints of
    those runs resumed under 0, 1, 2 and 3 again: each continues the same run. The first step
    after the resume sees the checkpoint's weights (its regularizer norms equal the uninterrupted
    run's), the data and schedule are the uninterrupted run's, and the final weights agree to
    float rounding (the stages' own arithmetic differs by ~1e-8)."""
    from recipe_dist.metrics import read_scalars

    a = read_scalars(straight / "tb")
    norms = [t for t in a if t.startswith("reg/norm/")]
    x = load_file(str(straight / "model" / "model.safetensors"))

    def resume_under(src: Path, stage: int, name: str, at: int) -> Path:
        out = tmp_path / name
        proc = run_cli([*COMMON, "--output_dir", out, "--resume", src, f"--train.zero_stage={stage}", "--checkpoint.keep=100"], nproc=2)
        assert resumed_from(proc.stdout) == at, proc.stdout[-2000:]
        b = read_scalars(out / "tb")
        assert norms and all(dict(a[t])[at + 1] == pytest.approx(dict(b[t])[at + 1], rel=1e-6) for t in norms), name
        assert keys(out)["rank0.jsonl"] == [r for r in keys(straight)["rank0.jsonl"] if r["step"] > at], name
        y = load_file(str(out / "model" / "model.safetensors"))
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x), name
        history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
        assert history[-1]["changes"]["train.zero_stage"][1] == stage
        return out

    src = straight / "checkpoints" / ckpt.tag_for(10)
    z0, z2, z3 = (resume_under(src, stage, f"1to{stage}", 10) for stage in (0, 2, 3))
    # The second round: each stage once as the target, from checkpoints of three stages.
    resume_under(z0 / "checkpoints" / ckpt.tag_for(20), 1, "0to1", 20)
    resume_under(z3 / "checkpoints" / ckpt.tag_for(20), 0, "3to0", 20)
    resume_under(z3 / "checkpoints" / ckpt.tag_for(20), 2, "3to2", 20)
    resume_under(z2 / "checkpoints" / ckpt.tag_for(20), 3, "2to3", 20)


def per_step(records: dict[str, list[dict]], steps) -> dict[int, list[str]]:
    """Sample keys per optimizer step over every rank's records."""
    out: dict[int, list[str]] = {}
    for recs in records.values():
        for r in recs:
            if r["step"] in steps:
                out.setdefault(r["step"], []).extend(r["keys"])
    return out


def assert_exact_epoch(straight: dict, resumed: dict, resumed_at: int, steps_per_epoch: int) -> None:
    """After a mid-epoch world-size change, each remaining step of the epoch has exactly the
    uninterrupted run's global batch, so the epoch (before + after the resume) reads every sample once."""
    rest = range(resumed_at + 1, steps_per_epoch + 1)
    a, b = per_step(straight, rest), per_step(resumed, rest)
    assert set(a) == set(b) == set(rest)
    assert all(sorted(a[t]) == sorted(b[t]) for t in rest)
    epoch = [k for t, ks in per_step(straight, range(1, resumed_at + 1)).items() for k in ks] + [k for ks in b.values() for k in ks]
    assert len(epoch) == len(set(epoch)) == steps_per_epoch * 16


def test_world_size_change_1_to_2_mid_epoch_is_exact(tmp_path):
    one = tmp_path / "one"
    run_cli([*COMMON, "--output_dir", one, "--checkpoint.keep=100", "--train.max_steps=24"])  # one epoch, 1 rank
    two = tmp_path / "two"
    proc = run_cli([*COMMON, "--output_dir", two, "--resume", one / "checkpoints" / ckpt.tag_for(10), "--train.max_steps=24"], nproc=2)
    assert resumed_from(proc.stdout) == 10 and "continuing on 2 (universal checkpoint) mid-epoch: the rest of epoch 0 is exactly" in proc.stdout
    assert sorted(keys(two)) == ["rank0.jsonl", "rank1.jsonl"]
    assert_exact_epoch(keys(one), keys(two), resumed_at=10, steps_per_epoch=24)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_replayed_reader_streams_match_what_dataloader_workers_gave(tmp_path):
    """The exact elastic resume replays an old rank's stream in-process: with 2 DataLoader workers
    it must interleave them as PyTorch did. Compared with the keys a real 2-worker run recorded."""
    from transformers import AutoTokenizer

    from recipe_dist.config import load_config
    from recipe_dist.data.train_data import TrainData
    from recipe_dist.cli import build_job

    out = tmp_path / "w2"
    args = [*COMMON[1:], "--output_dir", str(out), "--data.num_workers=2", "--train.max_steps=12", "--train.zero_stage=0"]
    run_cli(["purify", *args])
    cfg = load_config(str(TINY), [a for a in args[2:]])
    info = type("Dist", (), {"world_size": 1, "rank": 0, "is_main": True})()
    data = TrainData(cfg, info, build_job("purify", cfg), AutoTokenizer.from_pretrained(str(out / "input_model")), out, grad_accum=2)
    data.elastic = {"epoch": 0, "world_size": 1, "micro_batch_size": 8, "num_workers": 2, "grad_accum": 2}
    replayed = [[s["__key__"] for s in b] for b in itertools.islice(data._old_rank_batches(0, 0, 0), 24)]
    recorded = [r["keys"] for r in keys(out)["rank0.jsonl"]]
    assert replayed == recorded


def test_a_lone_rank_whose_launcher_dies_records_it_and_resumes_exactly(tmp_path):
    """The launcher holding a lone rank's stdout and stderr dies (slurmstepd crashes, a terminal
    closes): the rank's next log line meets a broken pipe. That is a lost launcher, not an error
    of the run: it leaves no failure note, records why in attempts.jsonl (nobody reads its
    stderr now), asks for a requeue (outside SLURM: says to resubmit), and the run then resumes
    to the uninterrupted run's weights."""
    one = [*COMMON, "--data.num_workers=0"]
    whole = tmp_path / "whole"
    run_cli([*one, "--output_dir", whole])
    out = tmp_path / "orphan"
    proc = subprocess.Popen([sys.executable, "-m", "recipe_dist", *map(str, one), "--output_dir", str(out)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while recorded_step(out) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its launcher was lost"
    proc.stdout.close()  # the launcher's ends of both pipes go away
    proc.stderr.close()
    assert proc.wait(timeout=120) != 0
    end = json.loads((out / "attempts.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and "its launcher is gone" in end["outcome"], end
    assert "BrokenPipeError" in end["outcome"] and "resubmit with --resume auto" in end["outcome"], end
    assert not (out / ".failures").exists()
    assert ckpt.find_resume(out / "checkpoints") is not None
    assert resumed_from(run_cli([*one, "--output_dir", out, "--resume", "auto"]).stdout) >= 4
    assert_same_weights(out, whole)
