"""SLURM for real: a one-node slurmctld + slurmd (tests/slurm_cluster.py) runs recipe-dist jobs
submitted with `recipe-dist slurm submit`; preemption, time limits and requeues must end in the
same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from slurm_cluster import Cluster, cluster_dir, ensure_installed, finish, log_of, wait_for_checkpoint

TINY = REPO / "configs" / "tiny-bert.yaml"
# 2 tasks x micro 8 = global 16; long enough to be signalled mid-run.
LONG = ["--data.synthetic_samples=2000", "--train.micro_batch_size=8", "--train.global_batch_size=16", "--train.max_steps=600",
        "--checkpoint.every_steps=25", "--train.log_every=5", "--preempt.max_requeues=20"]


@pytest.fixture(scope="module")
def cluster(request):
    why = ensure_installed()
    if why:
        pytest.fail(why)  # CI installs them; a machine that cannot is a real failure, not a skip
    with cluster_dir(request, "recipe-slurm-") as root:
        c = Cluster(root).start()
        yield c
        c.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same 2-rank run, uninterrupted, through launch/local.sh."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli(["purify", "--config", TINY, "--output_dir", out, *LONG], nproc=2, timeout=900)
    return (out / "model" / "model.safetensors").read_bytes()


def submit(cluster, out, *extra) -> str:
    proc = subprocess.run([sys.executable, "-m", "recipe_dist", "slurm", "submit", "--config", str(TINY), "--ntasks-per-node", "2",
                           "--output_dir", str(out), *extra], env=dict(cluster.env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def workers_of(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


@pytest.mark.slow
def test_submit_two_tasks_completes_and_exports(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out, "--data.synthetic_samples=320", "--train.micro_batch_size=8", "--train.global_batch_size=16")
    finish(cluster, job, out)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert (out / "model" / "model.safetensors").is_file()
    assert "launch: " in log_of(out)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["scontrol-requeue", "scancel-USR1", "scancel-TERM"])
def test_interrupted_job_requeues_resumes_and_ends_bit_identical(cluster, reference, tmp_path, how):
    out = tmp_path / "run"
    job = submit(cluster, out, *LONG)
    wait_for_checkpoint(out)
    if how == "scontrol-requeue":
        cluster.run(["scontrol", "requeue", job], check=True)
    else:
        cluster.run(["scancel", f"--signal={how.split('-')[1]}", job], check=True)
    finish(cluster, job, out)
    log = log_of(out)
    assert "resumed from" in log, log[-3000:]
    if how != "scontrol-requeue":
        assert "received: saved step" in log and "requeued SLURM job" in log, log[-3000:]
    assert (out / "model" / "model.safetensors").read_bytes() == reference


@pytest.mark.slow
def test_time_limit_signal_saves_requeues_and_finishes(cluster, tmp_path):
    # A 2-minute limit with the warning 60 s before it: every allocation is signalled 30-60 s in
    # (slurmctld checks limits periodically), saves and requeues itself, until one reaches the end.
    # 2,000 steps: on the idle machine the first allocation, beside the reference run, is
    # signalled after about 470 of them (17 s of start-up), on a loaded one after 300-800; more
    # steps only add allocations (5,000 took four). Periodic checkpoints are sparse, since the
    # signal's own save is what this test is about and 80 periodic saves per run cost about 10 s.
    # The log must name USR1, the signal that stopped the run, not the TERM that SLURM sends every
    # task when the job requeues itself (it once did: the handler let the later signal rename it).
    steps = [{"--train.max_steps": "--train.max_steps=2000", "--checkpoint.every_steps": "--checkpoint.every_steps=1000"}.get(a.split("=")[0], a)
             for a in LONG]
    out = tmp_path / "run"
    job = submit(cluster, out, "--time=2", "--signal-lead=60", *steps)
    reference = tmp_path / "reference"
    run_cli(["purify", "--config", TINY, "--output_dir", reference, *steps], nproc=2, timeout=2400)
    finish(cluster, job, out, timeout=2400)
    log = log_of(out)
    assert "USR1 received: saved step" in log and "resumed from" in log, log[-3000:]
    assert (out / "model" / "model.safetensors").read_bytes() == (reference / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_manifest_runs_as_an_array_and_status_shows_every_model(cluster, tmp_path, tiny_bert_dir):
    batch = tmp_path / "batch"
    manifest = tmp_path / "models.jsonl"
    manifest.write_text("".join(json.dumps({"model": str(tiny_bert_dir), "output_dir": str(tmp_path / f"m{i}"), "regularizer.lam": lam}) + "\n"
                                for i, lam in enumerate([0.5, 1.0, 1.5])))
    proc = subprocess.run([sys.executable, "-m", "recipe_dist", "slurm", "submit", "--config", str(TINY), "--manifest", str(manifest),
                           "--output_dir", str(batch), "--data.synthetic_samples=96", "--train.micro_batch_size=8",
                           "--train.global_batch_size=8"], env=dict(cluster.env, OMP_NUM_THREADS="1"), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = proc.stdout.strip().splitlines()[-1]
    for i in range(3):
        finish(cluster, f"{job}_{i}", tmp_path / f"m{i}")
    lams = [__import__("yaml").safe_load((tmp_path / f"m{i}" / "config.yaml").read_text())["regularizer"]["lam"] for i in range(3)]
    assert lams == [0.5, 1.0, 1.5]
    status = subprocess.run([sys.executable, "-m", "recipe_dist", "slurm", "status", "--output_dir", str(batch)], env=cluster.env,
                            capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("| done |") == 3, status.stdout


def test_dry_run_prints_the_directives_and_submits_nothing(tmp_path):
    proc = run_cli(["slurm", "submit", "--config", TINY, "--output_dir", tmp_path / "run", "--nodes", "2", "--ntasks-per-node", "4",
                    "--gpus-per-node", "4", "--time", "12:00:00", "--partition", "gpu", "--account", "proj", "--qos", "high",
                    "--constraint", "a100", "--sbatch=--mem=64G", "--dry-run", "--regularizer.lam=0.5", "--train.global_batch_size=128"])
    for d in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=12:00:00", "--partition=gpu", "--account=proj",
              "--qos=high", "--constraint=a100", "--mem=64G", "--signal=USR1@120", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {d}" in proc.stdout, d
    assert "--regularizer.lam=0.5" in proc.stdout and "sbatch --parsable" in proc.stdout
    assert not (tmp_path / "run").exists()
    # The submit line: shell-quoted, --output_dir once, the script by the name the user saves it under.
    import shlex

    line = proc.stdout.strip().splitlines()[-1].removeprefix("# ")
    mkdir, sbatch = line.split(" && ")
    assert shlex.split(mkdir) == ["mkdir", "-p", str(tmp_path / "run" / "slurm")]
    words = shlex.split(sbatch)
    assert words[:3] == ["sbatch", "--parsable", "job.sbatch"] and words.count("--output_dir") == 1
    assert words[words.index("--output_dir") + 1] == str(tmp_path / "run")


def test_bad_manifest_line_and_missing_sbatch_are_one_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"model": "/m", "output_dir": str(tmp_path / "a")}) + "\n")
    proc = run_cli(["slurm", "submit", "--config", TINY, "--manifest", manifest, "--output_dir", tmp_path / "b"], check=False)
    # A real model with no auxiliary data would train on synthetic text: refused before the queue.
    assert proc.returncode == 2 and f"{manifest}:1: data.train_urls: empty" in proc.stderr.strip().splitlines()[-1]
    manifest.write_text(json.dumps({"model": "/m", "output_dir": str(tmp_path / "a"), "data.synthetic_samples": 64}) + "\n{broken\n")
    proc = run_cli(["slurm", "submit", "--config", TINY, "--manifest", manifest, "--output_dir", tmp_path / "b"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("recipe-dist: error:")
    assert f"{manifest}:2" in proc.stderr
    manifest.write_text(json.dumps({"model": "/m", "output_dir": str(tmp_path / "a"), "regularizer.lam": -1}) + "\n")
    proc = run_cli(["slurm", "submit", "--config", TINY, "--manifest", manifest, "--output_dir", tmp_path / "b"], check=False)
    assert proc.returncode == 2 and f"{manifest}:1" in proc.stderr and "regularizer.lam" in proc.stderr
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    proc = run_cli(["slurm", "submit", "--config", TINY, "--output_dir", tmp_path / "c"], check=False, env={"PATH": str(empty_path)})
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr.strip().splitlines()[-1]


def recording_scontrol(tmp_path: Path) -> tuple[Path, Path]:
    """(a directory holding an `scontrol` that only appends its arguments to a file, that file)."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    record = tmp_path / "scontrol.args"
    (stub_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    (stub_dir / "scontrol").chmod(0o755)
    return stub_dir, record


@pytest.mark.slow
def test_signal_handler_saves_agrees_and_runs_the_requeue_command(tmp_path):
    """flag -> all-reduce -> save -> `scontrol requeue <array job>_<task>`, with scontrol a recording stub."""
    stub_dir, record = recording_scontrol(tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{stub_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_ARRAY_JOB_ID="70",
               SLURM_ARRAY_TASK_ID="3", SLURM_RESTART_COUNT="1")
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "2", "purify", "--config", str(TINY), "--output_dir", str(out), *LONG]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_checkpoint(out)
    # Signal one rank only (a child of torchrun): the all-reduce must stop both after the same step.
    os.kill(max(workers_of(proc.pid)), signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert record.is_file(), stdout[-2000:] + stderr[-2000:]
    assert record.read_text().split() == ["requeue", "70_3"]
    assert "USR1 received: saved step" in stdout
    latest = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / latest / "COMPLETE").is_file() and not (out / "model").exists()
    # Over the limit: no requeue, one clear error.
    proc = subprocess.Popen([*cmd, "--resume=auto"], cwd=REPO, env=dict(env, SLURM_RESTART_COUNT="20"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = latest
    deadline = time.time() + 240
    while time.time() < deadline and (out / "checkpoints" / "latest").read_text() == seen:
        time.sleep(0.3)  # the resumed run is past its start: its handlers are installed
    os.kill(max(workers_of(proc.pid)), signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "already requeued 20 times" in stderr


def test_status_says_unknown_not_failed_when_squeue_cannot_be_read(tmp_path):
    """A queue that cannot be read is not evidence that a job failed: a run with no summary and no
    error in its log is 'unknown', with squeue's own message; a run that ended is still 'done'."""
    batch, fake = tmp_path / "batch", tmp_path / "bin"
    (batch / "slurm").mkdir(parents=True)
    done, waiting = tmp_path / "done", tmp_path / "waiting"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"steps": 7}))
    (batch / "slurm" / "jobs.jsonl").write_text(json.dumps({"job": "41", "array": True, "outputs": [str(done), str(waiting)]}) + "\n")
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    (fake / "squeue").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "recipe_dist", "slurm", "status", "--output_dir", str(batch)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"| 41_0 | {done} | done | 7 steps |" in out.stdout
    assert f"| 41_1 | {waiting} | unknown | squeue failed: slurm_load_jobs error: Unable to contact slurm controller |" in out.stdout
    assert "failed |" not in out.stdout.replace("squeue failed", "")


def test_status_reads_cut_short_files_without_a_traceback(tmp_path):
    """A jobs.jsonl whose last line was cut short, a truncated progress.json or summary.json: the
    table shows what it can; a damaged line before the end is one error naming it."""
    batch, fake = tmp_path / "batch", tmp_path / "bin"
    (batch / "slurm").mkdir(parents=True)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "summary.json").write_text('{"steps": 7, "out')  # cut short
    (b / "progress.json").write_text('{"step": 3, "total')
    good = json.dumps({"job": "51", "array": True, "outputs": [str(a), str(b)]})
    (batch / "slurm" / "jobs.jsonl").write_text(good + "\n" + '{"job": "52", "arr')
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho '51_1 R'\n")
    (fake / "squeue").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "recipe_dist", "slurm", "status", "--output_dir", str(batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "jobs.jsonl:2: last line is incomplete" in out.stderr
    assert f"| 51_1 | {b} | running | starting |" in out.stdout, out.stdout
    (b / "progress.json").write_text('{"step": 5}')  # parses, but lacks the fields the ETA needs
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and f"| 51_1 | {b} | running | starting |" in out.stdout, out.stderr[-2000:]
    (batch / "slurm" / "jobs.jsonl").write_text('{"job": "5\n' + good + "\n")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "jobs.jsonl:1: not a submission record" in out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--nodes", "-2"], "--nodes: must be >= 1, got -2"),
    (["--ntasks-per-node", "0"], "--ntasks-per-node: must be >= 1"),
    (["--time", "abc"], "--time: 'abc' is not a SLURM time limit"),
    (["--signal-lead", "-5"], "--signal-lead: seconds before the time limit"),
    (["--signal", "USR2"], "--signal: USR2 is not one the run handles (preempt.signals: USR1, TERM)"),
    (["--nodes", "3"], "--nodes 3 x --ntasks-per-node 1: train.global_batch_size=32 cannot be split over 3 ranks; pass "
                       "--train.global_batch_size=30 or --train.global_batch_size=33"),
])
def test_submit_refuses_a_bad_directive_before_submitting(tmp_path, args, message):
    proc = run_cli(["slurm", "submit", "--config", TINY, "--output_dir", tmp_path / "run", "--dry-run", *args], check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # several CLI processes: CI runs it, the fast lane leaves it out
def test_submit_accepts_the_time_forms_and_a_handled_signal(tmp_path):
    for t in ("90", "30:00", "12:00:00", "2-00", "2-12:00:00", "UNLIMITED"):
        run_cli(["slurm", "submit", "--config", TINY, "--output_dir", tmp_path / "run", "--dry-run", "--time", t])
    proc = run_cli(["slurm", "submit", "--config", TINY, "--output_dir", tmp_path / "run", "--dry-run", "--signal", "B:USR2",
                    "--preempt.signals", "USR2,TERM"])
    assert "#SBATCH --signal=B:USR2@120" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "own-error", "own-error-rank0"])
def test_a_lost_rank_requeues_the_job_but_a_rank_failing_on_its_own_does_not(tmp_path, fault):
    """A rank SIGKILLed from outside (the OOM killer, a dead node) is named by the survivor, which
    requeues the job; a rank that stops on an error of its own (here: the one shard it reads is
    corrupt) says so, and the survivor names it and does not requeue, since a restart would repeat
    it; also when the failing rank is rank 0, whose process holds the store (its note is in the
    run directory)."""
    stub_dir, record = recording_scontrol(tmp_path)
    aux = tmp_path / "aux.tsv"
    aux.write_text("sentence\n" + "".join(f"plain sentence number {i} about nothing in particular .\n" for i in range(400)))
    run_cli(["shards", "--input", aux, "--output", tmp_path / "shard", "--samples-per-shard", "200"])
    failing, survivor = (0, 1) if fault == "own-error-rank0" else (1, 0)
    if fault.startswith("own-error"):
        # The manifest keeps the counts, so only the rank that reads this shard meets the damage
        # (with this seed rank R reads shard R).
        with open(tmp_path / f"shard-00000{failing}.tar", "r+b") as f:
            f.truncate(20_000)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{stub_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77")
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "2", "purify", "--config", str(TINY), "--output_dir", str(out),
           "--data.train_urls", str(tmp_path / "shard-{000000..000001}.tar"), "--data.num_workers=0", "--train.micro_batch_size=8",
           "--train.global_batch_size=16", "--train.max_steps=400", "--checkpoint.every_steps=10", "--preempt.collective_timeout=30"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if fault == "killed":
        wait_for_checkpoint(out)
        os.kill(max(workers_of(proc.pid)), signal.SIGKILL)  # rank 1: torchrun starts the ranks in order
    _, stderr = proc.communicate(timeout=300)
    errors = [ln for ln in stderr.splitlines() if ln.startswith(f"recipe-dist: error: rank {survivor}:")]
    assert proc.returncode != 0 and len(errors) == 1, stderr[-3000:]
    if fault == "killed":
        assert "lost rank 1 on " in errors[0] and "its process is gone" in errors[0] and "requeued SLURM job 77" in errors[0], errors
        assert record.read_text().split() == ["requeue", "77"]
    else:
        assert "corrupt shard" in stderr and f"rank {failing} stopped with an error of its own (corrupt shard" in errors[0], errors
        assert "not requeued" in errors[0] and not record.exists()
    assert "Traceback" not in stderr
