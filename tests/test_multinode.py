"""More than one node, for real: a three-node SLURM cluster in network namespaces
(tests/netns_cluster.py) runs two-node jobs submitted with `recipe-dist slurm submit --nodes 2`.
Every run, interrupted or not, must end byte-identical to the same two ranks on one host
(`launch/local.sh 2`): a node killed outright, a network cut longer than the collective timeout,
a requeue onto another pair of nodes, a crash in the middle of one rank's checkpoint save."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from netns_cluster import NetnsCluster, netns_unavailable
from slurm_cluster import cluster_dir, ensure_installed, finish, log_of, wait_for_checkpoint

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny-bert.yaml"
# 2 nodes x 1 task x micro 8 = global 16. Long enough to be interrupted after a checkpoint or two;
# the collective timeout is short so a cut network is noticed within seconds.
RUN = ["--data.synthetic_samples=2000", "--train.micro_batch_size=8", "--train.global_batch_size=16", "--train.max_steps=300",
       "--checkpoint.every_steps=25", "--train.log_every=5", "--preempt.max_requeues=10", "--preempt.collective_timeout=8"]
SHORT = ["--data.synthetic_samples=320", "--train.micro_batch_size=8", "--train.global_batch_size=16", "--train.max_steps=40",
         "--checkpoint.every_steps=20"]


@pytest.fixture(scope="module")
def cluster(request):
    why = ensure_installed() or netns_unavailable()
    if why:
        pytest.fail(why)  # CI runs as root with slurm-wlm: a machine that cannot is a real failure, not a skip
    with cluster_dir(request, "recipe-netns-") as root:
        c = NetnsCluster(root, slurmd_timeout=30).start()
        yield c
        c.stop()
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert c.tag not in leftover, leftover


@pytest.fixture(autouse=True)
def all_nodes_idle(cluster):
    """Each test starts on a whole cluster and leaves no process of its job behind on any node."""
    for node in cluster.nodes:
        if node not in cluster.slurmd:
            cluster.start_node(node)
        cluster.link(node, up=True)
        cluster.run(["scontrol", "update", f"NodeName={cluster.nodes[node]['name']}", "State=RESUME"])
    cluster.wait_idle(*cluster.nodes, timeout=90)
    yield
    deadline = time.time() + 60
    while time.time() < deadline and any(job_processes(cluster, n) for n in cluster.nodes):
        time.sleep(0.5)
    assert not any(job_processes(cluster, n) for n in cluster.nodes), {n: job_processes(cluster, n) for n in cluster.nodes}


def job_processes(cluster, node: str) -> list[str]:
    """Processes in the node's namespace other than its slurmd: what a job left behind."""
    daemon = cluster.slurmd.get(node)
    left = []
    for pid in cluster.node_pids(node):
        if daemon is not None and pid == daemon.pid:
            continue
        try:
            left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            pass
    return left


def reference(tmp_path_factory, args) -> bytes:
    out = tmp_path_factory.mktemp("local") / "run"
    run_cli(["purify", "--config", TINY, "--output_dir", out, *args], nproc=2, timeout=900)
    return (out / "model" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The faults' uninterrupted twin: the same two ranks on one host, ZeRO-1."""
    return reference(tmp_path_factory, [*RUN, "--train.zero_stage=1"])


def submit(cluster, out: Path, *args, env=None) -> str:
    proc = subprocess.run([sys.executable, "-m", "recipe_dist", "slurm", "submit", "--config", str(TINY), "--nodes", "2",
                           "--ntasks-per-node", "1", "--output_dir", str(out), *args],
                          env={**cluster.env, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def said(out: Path) -> str:
    """The job's log less its progress bars: what an assertion message should show."""
    return "\n".join(ln for ln in log_of(out).splitlines() if "step/s" not in ln and "?step" not in ln)[-4000:]


def slurmd_log(cluster, node: str) -> str:
    """The end of a node's slurmd log, and where the whole of it is kept."""
    path = cluster.dirs["log"] / f"slurmd-{cluster.nodes[node]['name']}.log"
    return f"{path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:])


def attempts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]


def status(cluster, out: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "recipe_dist", "slurm", "status", "--output_dir", str(out)], env=cluster.env,
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("stage", [1, 3])
def test_two_node_job_matches_the_same_ranks_on_one_host(cluster, tmp_path, tmp_path_factory, stage):
    out = tmp_path / "run"
    job = submit(cluster, out, *SHORT, f"--train.zero_stage={stage}")
    finish(cluster, job, out)
    log = log_of(out)
    a, b = (cluster.nodes[n] for n in ("a", "b"))
    # One rank per node, meeting at the first node's own address, not loopback.
    assert f"rendezvous {a['name']}:" in log and f"rank 0 {a['name']} {a['ip']}, rank 1 {b['name']} {b['ip']}" in log, said(out)
    assert (out / "model" / "model.safetensors").read_bytes() == reference(tmp_path_factory, [*SHORT, f"--train.zero_stage={stage}"])


def test_a_node_that_dies_is_named_and_the_job_resumes_elsewhere(cluster, local_run, tmp_path):
    """Node A (rank 0 and the batch script) loses power, slurmd and all: the rank on B names the
    lost peer and requeues the job; A is still down, so the job resumes on B+C, rank 0 on B."""
    out = tmp_path / "run"
    job = submit(cluster, out, *RUN, "--train.zero_stage=1")
    wait_for_checkpoint(out)
    cluster.kill_node("a")
    deadline = time.time() + 120
    while time.time() < deadline and len(attempts(out)) < 3:  # the survivor's end line, then the next start
        if cluster.job_state(job) == "PENDING":
            cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        time.sleep(1)
    cluster.start_node("a")  # the node comes back later; the job no longer needs it
    finish(cluster, job, out)
    first_end = attempts(out)[1]
    # The survivor's stderr went through srun on node A and is lost; node B's slurmd says how its task ended.
    assert first_end["event"] == "end" and first_end["host"] == "nodeb", (first_end, slurmd_log(cluster, "b"))
    assert "lost rank 0 on nodea" in first_end["outcome"] and f"requeued SLURM job {job}" in first_end["outcome"], first_end
    restarts = [r for r in attempts(out) if r["event"] == "start"]
    assert restarts[0]["nodes"] == "nodea,nodeb" and restarts[-1]["nodes"] == "nodeb,nodec" and restarts[-1]["host"] == "nodeb"
    assert restarts[-1]["from_step"] > 0
    history = status(cluster, out)
    assert "lost rank 0 on nodea" in history and "| nodeb,nodec | nodeb |" in history and "finished" in history, history
    assert (out / "model" / "model.safetensors").read_bytes() == local_run


def test_a_node_whose_slurm_daemons_crash_is_named_and_the_job_resumes_elsewhere(cluster, local_run, tmp_path):
    """Only SLURM's daemons on node A crash (slurmd and the job's slurmstepds); the node, its
    network and srun stay up. Rank 0's next log line then meets a broken pipe: that is its
    launcher lost, not an error of its own (before the fix it left a note, and the rank on B
    stopped without requeueing: "a restart would repeat it"). The rank on B must name rank 0
    lost and requeue, and the job must end as the uninterrupted run."""
    out = tmp_path / "run"
    job = submit(cluster, out, *RUN, "--train.zero_stage=1")
    wait_for_checkpoint(out)
    cluster.kill_daemons("a")
    deadline = time.time() + 150
    while time.time() < deadline and len(attempts(out)) < 3:
        if cluster.job_state(job) == "PENDING":
            cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        time.sleep(1)
    cluster.start_node("a")
    finish(cluster, job, out)
    first_end = attempts(out)[1]
    assert first_end["event"] == "end" and first_end["host"] == "nodeb", (first_end, slurmd_log(cluster, "b"))
    assert "lost rank 0 on nodea" in first_end["outcome"] and f"requeued SLURM job {job}" in first_end["outcome"], first_end
    assert (out / "model" / "model.safetensors").read_bytes() == local_run


def test_a_network_cut_longer_than_the_timeout_fails_the_rank_with_one_line_and_requeues(cluster, local_run, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out, *RUN, "--train.zero_stage=1")
    wait_for_checkpoint(out)
    cluster.link("b", up=False)  # rank 1's node drops off the network, longer than preempt.collective_timeout (8 s)
    deadline = time.time() + 90
    while time.time() < deadline and "lost rank 1" not in log_of(out):
        time.sleep(0.5)
    cluster.link("b", up=True)
    finish(cluster, job, out)
    log = log_of(out)
    lines = [ln for ln in log.splitlines() if "lost rank 1 on nodeb" in ln]
    assert lines and lines[0].startswith("recipe-dist: error: rank 0: lost rank 1 on nodeb"), said(out)
    assert "does not answer (node down or network cut)" in lines[0] and f"requeued SLURM job {job}" in lines[0]
    assert "Traceback" not in log
    assert (out / "model" / "model.safetensors").read_bytes() == local_run


def test_a_requeue_onto_another_node_pair_resumes_and_status_shows_the_history(cluster, local_run, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, out, *RUN, "--train.zero_stage=1")
    wait_for_checkpoint(out)
    cluster.run(["scontrol", "update", "NodeName=nodea", "State=DRAIN", "Reason=maintenance"], check=True)
    cluster.run(["scontrol", "requeue", job], check=True)
    finish(cluster, job, out)
    starts = [r for r in attempts(out) if r["event"] == "start"]
    assert [(s["nodes"], s["host"]) for s in (starts[0], starts[-1])] == [("nodea,nodeb", "nodea"), ("nodeb,nodec", "nodeb")]
    assert "resumed from" in log_of(out)
    history = status(cluster, out)
    assert "| nodea,nodeb | nodea |" in history and "| nodeb,nodec | nodeb |" in history, history
    assert (out / "model" / "model.safetensors").read_bytes() == local_run


def test_a_crash_inside_one_ranks_checkpoint_save_never_uses_the_partial_checkpoint(cluster, local_run, tmp_path):
    """Rank 1 (node B) is SIGKILLed inside torch.save of the step-50 checkpoint, once: rank 0
    names it, requeues, and the job resumes from step 25, the last complete one."""
    hook = tmp_path / "hook"
    hook.mkdir()
    marker = tmp_path / "crashed"
    (hook / "sitecustomize.py").write_text(f"""
import os, signal
if os.environ.get("SLURM_PROCID") == "1" and not os.path.exists({str(marker)!r}):
    import torch
    _save = torch.save
    def _crash_in_save(obj, f, *a, **k):
        if "step_00000050" in str(f) and ".partial" in str(f):
            open({str(marker)!r}, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(obj, f, *a, **k)
    torch.save = _crash_in_save
""")
    out = tmp_path / "run"
    job = submit(cluster, out, *RUN, "--train.zero_stage=1", env={"PYTHONPATH": str(hook)})
    finish(cluster, job, out)
    assert marker.is_file(), "the save was never interrupted"
    log = log_of(out)
    assert "lost rank 1 on nodeb" in log and "its process is gone" in log, said(out)
    assert "resumed from" in log and "step_00000025 at step 25" in log, said(out)
    assert (out / "model" / "model.safetensors").read_bytes() == local_run
