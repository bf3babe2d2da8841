import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Deterministic CPU kernels for bit-identical comparisons; quiet tokenizers in forked workers.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share the 2 cores: a worker's own torch work (e.g. pre-training a tiny PTM
    # in-process) on 2 intra-op threads beside the other worker ran 5x slower (32 s -> 166 s), the
    # threads spinning for a core the other worker holds. One thread each, like the tests'
    # subprocesses (OMP_NUM_THREADS=1 in run_cli).
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, nproc: int = 1, env=None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `recipe-dist ARGS` as a user would: one process, or `launch/local.sh N` for N > 1."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "recipe_dist", *map(str, args)]
    else:
        cmd = ["bash", str(REPO / "launch" / "local.sh"), str(nproc), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT PTM (2 layers, width 32) with dropout off, saved as safetensors."""
    from recipe_dist.config import TinyArchConfig
    from recipe_dist.models.mlm import build_tiny_bert

    arch = TinyArchConfig(hidden_size=32, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), arch, seed=0)


# The longest files first: xdist (--dist loadfile, pyproject) hands a worker its next file when it
# is free, so starting the 10-minute SLURM file last would leave one worker running it alone at the
# end. The two cluster files mostly wait (on SlurmdTimeout, time limits, requeues), so they do not
# start together: the first three workers take one waiting file and two that keep a core busy
# (the stage-runner smokes), and the multi-node file follows the first of those to finish.
LONGEST_FIRST = ["test_slurm.py", "test_lab_study.py", "test_bench_defense.py", "test_multinode.py", "test_resume.py", "test_causal_lm.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


def wait_until_stopped(pids, within_s: float = 30.0) -> None:
    """Until every thread of `pids` is stopped (state T in /proc/PID/task/*/stat; gone or a zombie
    counts): kill(SIGSTOP) returns before the stop lands, and one thread stops the others later."""
    def running(pid: int) -> int:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return 0
        n = 0
        for tid in tids:
            try:
                state = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()[0]  # the name may hold spaces
            except OSError:
                continue
            n += state not in ("T", "t", "Z", "X")
        return n

    deadline = time.monotonic() + within_s
    while any(running(p) for p in pids):
        assert time.monotonic() < deadline, f"not stopped {within_s:g} s after SIGSTOP: {sorted(pids)}"
        time.sleep(0.001)

