"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd from
Debian's slurm-wlm, with state, spool, logs and sockets in a temporary directory and non-default
ports, stopped by pid. Installs slurm-wlm and munge with apt-get when they are missing (root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue")


def ensure_installed() -> str | None:
    """None when SLURM and munge are available (installing them if needed), else why not."""
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm and munge are missing and cannot be installed (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        proc = subprocess.run("apt-get update -q && apt-get install -y -q slurm-wlm munge", shell=True, env=env, capture_output=True, text=True)
    return None if proc.returncode == 0 else f"apt-get install slurm-wlm munge failed: {proc.stderr.strip().splitlines()[-1:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


@contextlib.contextmanager
def cluster_dir(request, prefix: str):
    """A directory for a test cluster's state, spool, sockets and daemon logs. It is made under
    /tmp, not pytest's tmp_path: pytest's tree is mode 0700 and munged, running as user munge,
    must reach its socket. Removed once the module's tests all passed; kept when one failed or
    the cluster did not start, since the daemons' logs (a task's exit status is in
    slurmd-NODE.log) are the evidence."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    failed_before = request.session.testsfailed
    yield root  # a cluster that failed to start raises here: its directory is kept
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)


def start_munge(munge_dir: Path, sock: Path, env: dict) -> int:
    """munged as the munge user with a fresh key, its socket at `sock`; returns its pid."""
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(munge_dir, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    os.chmod(key, 0o400)
    os.chmod(munge_dir, 0o700)
    pidfile = munge_dir / "munged.pid"
    subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--key-file={key}", f"--socket={sock}", f"--pid-file={pidfile}",
                    f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}", "--force"], check=True, env=env)
    _wait(lambda: pidfile.is_file() and pidfile.read_text().strip(), 10, "munged")
    return int(pidfile.read_text())


def common_conf(dirs: dict, sock: Path, slurmd_suffix: str) -> str:
    """The slurm.conf lines both test clusters share: root daemons, munge at `sock`, state, spool,
    pid and log files under `dirs` (`slurmd_suffix` "/%n"-style keeps several slurmds apart), no
    cgroups, requeue allowed, a node back in service once its slurmd registers again."""
    return f"""SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
StateSaveLocation={dirs['state']}
SlurmdSpoolDir={dirs['spool']}{slurmd_suffix and '/' + slurmd_suffix}
SlurmctldPidFile={dirs['run']}/slurmctld.pid
SlurmdPidFile={dirs['run']}/slurmd{slurmd_suffix and '-' + slurmd_suffix}.pid
SlurmctldLogFile={dirs['log']}/slurmctld.log
SlurmdLogFile={dirs['log']}/slurmd{slurmd_suffix and '-' + slurmd_suffix}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
SlurmdDebug=verbose
MinJobAge=600
InactiveLimit=0
"""


class SlurmQueries:
    """What the tests ask a running test cluster (its `env` names its slurm.conf and munge socket)."""

    env: dict

    def run(self, cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)

    def job_field(self, job: str, field: str) -> str:
        for tok in self.run(["scontrol", "show", "job", job]).stdout.split():
            if tok.startswith(field + "="):
                return tok.split("=", 1)[1]
        return ""

    def job_state(self, job: str) -> str:
        return self.job_field(job, "JobState") or "UNKNOWN"

    def wait_job(self, job: str, timeout: float = 300) -> str:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
        _wait(lambda: self.job_state(job) in done, timeout, f"job {job}")
        return self.job_state(job)


class Cluster(SlurmQueries):
    def __init__(self, root: Path):
        # munged runs as the munge user, which must reach its socket directory: a 0755 root.
        os.chmod(root, 0o755)
        self.root = root
        self.pids: list[int] = []
        host = socket.gethostname()
        self.dirs = {k: root / k for k in ("state", "spool", "log", "munge", "run")}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.socket = self.dirs["munge"] / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), MUNGE_SOCKET=str(self.socket))
        cpus = os.cpu_count() or 2
        self.conf.write_text(f"""ClusterName=recipetest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
{common_conf(self.dirs, self.socket, slurmd_suffix="")}NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self) -> "Cluster":
        self.pids.append(start_munge(self.dirs["munge"], self.socket, self.env))
        for daemon, pidfile in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            subprocess.run([f"/usr/sbin/{daemon}", "-f", str(self.conf)], check=True, env=self.env)
            path = self.dirs["run"] / pidfile
            _wait(lambda p=path: p.is_file() and p.read_text().strip(), 20, daemon)
            self.pids.append(int(path.read_text()))
        _wait(lambda: "idle" in self.run(["sinfo", "-h", "-o", "%t"]).stdout, 60, "the node to become idle")
        return self

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)


# ---------------------------------------------------------------------- helpers for the tests of jobs
def log_of(out: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((out / "slurm").glob("slurm-*.out")))


def wait_for_checkpoint(out: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*[0-9]")):
        time.sleep(0.3)
    assert list((out / "checkpoints").glob("step_*[0-9]")), "no checkpoint appeared"


def finish(cluster, job: str, out: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    pending_since = None
    while time.time() < deadline and not (out / "summary.json").is_file():
        state = cluster.job_state(job)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break  # ended without the model: fail now, with its log
        pending_since = (pending_since or time.time()) if state == "PENDING" else None
        if pending_since and time.time() - pending_since > 10:
            # SLURM makes a requeued job eligible only ~2 minutes later (EligibleTime); skip the wait,
            # but only once the previous allocation's batch script has surely ended (srun gives its
            # tasks up to 7 s): started at once, the new allocation raced the old script's exit,
            # which then completed the job.
            cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        time.sleep(1)
    state = cluster.wait_job(job, 120)
    assert (out / "summary.json").is_file(), f"{state}\n{log_of(out)[-4000:]}"
