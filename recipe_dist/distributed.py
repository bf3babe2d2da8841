"""Rank discovery and process-group setup (torchrun, the deepspeed launcher, SLURM, or none)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this process when its launcher dies (Linux PR_SET_PDEATHSIG).

    torchrun starts every rank in a session of its own, so a kill -9 of the launcher (or of its
    process group, or the OOM killer taking the agent) would leave the ranks training on as
    orphans that hold the run directory's lock. Called first thing in a rank that torchrun
    started; a launcher already gone by then (the race before the prctl) ends the rank at once.
    Under srun the ranks are slurmstepd's children, and SLURM's cgroup ends them with the job.
    """
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher or launcher == 1:
        os._exit(1)


def extension_cache() -> str:
    """TORCH_EXTENSIONS_DIR for this Python environment (the user's own setting wins).

    DeepSpeed JIT-builds its CPU shared-memory communication op at every process-group start.
    torch keys its build cache by Python and CUDA version only, so two environments on one
    machine (two venvs, two torch builds) overwrite each other's build and each start rebuilds
    it (~100 s instead of ~14 s for a small purify). Keyed here by the interpreter prefix and the
    torch/DeepSpeed versions; under a cache directory that is not writable (a read-only HOME)
    it goes to the temporary directory instead of failing inside DeepSpeed's build.
    """
    import hashlib
    import sys
    import tempfile
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    try:
        ds = version("deepspeed")
    except PackageNotFoundError:
        ds = "none"
    key = hashlib.sha256(f"{sys.prefix}|{torch.__version__}|{ds}".encode()).hexdigest()[:12]
    candidates = [os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "recipe-dist"),
                  os.path.join(tempfile.gettempdir(), f"recipe-dist-{os.getuid()}")]
    for base in candidates:
        path = os.path.join(base, "torch_extensions", key)
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    return os.path.join(candidates[-1], "torch_extensions", key)


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; gloo on CPU, nccl on GPU.

    With no launcher the run is a single process: the rendezvous variables are filled in
    for a world of one so the same code path (and DeepSpeed) runs.
    """
    os.environ["TORCH_EXTENSIONS_DIR"] = extension_cache()  # before DeepSpeed builds its comm op
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        # DeepSpeed prints "... deepspeed_shm_comm_op built successfully" on every rank at every
        # start; anything else it prints here is passed on.
        import contextlib
        import io
        import sys

        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        rest = [ln for ln in said.getvalue().splitlines() if ln.strip() and "built successfully" not in ln]
        if rest:
            print("\n".join(rest), file=sys.stdout, flush=True)
    return info


def destroy_distributed() -> None:
    """Tear the process group down before the interpreter exits. Left to static destruction,
    gloo's worker threads are destroyed while joinable and the C++ runtime aborts the process
    ("terminate called without an active exception", exit -6) after an otherwise clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 and hand its result to every rank.

    A failure on rank 0 is re-raised on every rank with the same message, so no rank is left
    waiting in a collective for a result that will never come.
    """
    from .errors import RecipeError

    outcome = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except RecipeError as e:
            outcome = ("err", str(e))
        except Exception as e:  # anything else still must not strand the other ranks
            outcome = ("err", f"{type(e).__name__}: {e}")
    outcome = broadcast_object(outcome)
    if outcome[0] == "err":
        raise RecipeError(outcome[1])
    return outcome[1]
