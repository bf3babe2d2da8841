"""Rank discovery and process-group setup (torchrun, the deepspeed launcher, SLURM, or none)."""

from __future__ import annotations

import contextlib
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


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; gloo on CPU, nccl on GPU.

    With no launcher the run is a single process: the rendezvous variables are filled in
    for a world of one so the same code path (and DeepSpeed) runs. `timeout_s` is the training
    steps' collective bound (preempt.collective_timeout, applied by `step_timeout`); start-up and
    export, where one rank may work alone for long (building the input, writing the model) while
    the others wait, get max(timeout_s, SETUP_TIMEOUT_S). None keeps DeepSpeed's default.
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
        import io
        import sys

        said = io.StringIO()
        from datetime import timedelta

        global _SETUP_TIMEOUT
        _SETUP_TIMEOUT = timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S)) if timeout_s else None
        kwargs = {"timeout": _SETUP_TIMEOUT} if _SETUP_TIMEOUT else {}
        if _SETUP_TIMEOUT:
            # The groups DeepSpeed makes later (ZeRO's data-parallel group, via dist.new_group) do
            # not inherit the world group's timeout: new_group falls back to torch's module default,
            # so it is set here too; `step_timeout` then changes every group at once.
            from torch.distributed import distributed_c10d as c10d

            c10d.default_pg_timeout = _SETUP_TIMEOUT
            if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
                c10d.default_pg_nccl_timeout = _SETUP_TIMEOUT
        with contextlib.redirect_stdout(said):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs)
        rest = [ln for ln in said.getvalue().splitlines() if ln.strip() and "built successfully" not in ln]
        if rest:
            print("\n".join(rest), file=sys.stdout, flush=True)
        _meet_peers(info)
    return info


SETUP_TIMEOUT_S = 1800.0  # torch's own default for gloo
_SETUP_TIMEOUT = None


def _groups() -> list:
    from torch.distributed import distributed_c10d as c10d

    world = getattr(c10d, "_world", None)
    return list(getattr(world, "pg_map", {}).keys()) if world is not None else []


def step_timeout(seconds: float | None) -> None:
    """Bound every collective of every process group (ZeRO's included) by `seconds` from now on,
    or, with None, go back to the start-up bound. The trainer sets preempt.collective_timeout for
    its step loop only: at start-up and export one rank may work alone for minutes (building the
    input, writing the model) while the others wait in a collective, and a bound meant to catch a
    lost node within seconds failed healthy runs there (a tiny run's start on a loaded machine
    took over 8 s)."""
    from datetime import timedelta

    if not dist.is_initialized() or dist.get_world_size() == 1 or _SETUP_TIMEOUT is None:
        return
    bound = timedelta(seconds=seconds) if seconds else _SETUP_TIMEOUT
    set_timeout = getattr(dist, "set_timeout", None)
    if set_timeout is None:  # torch < 2.8
        from torch.distributed.distributed_c10d import _set_pg_timeout as set_timeout
    for group in _groups():
        set_timeout(bound, group)


# ---------------------------------------------------------------------- lost peers
# Every rank listens on a small TCP port of its own (a thread that accepts and closes) and learns
# every other rank's host, address and port at start. When a collective fails (a peer's process
# died, its node went down, the network between them dropped past the collective timeout), the
# surviving rank knocks on each peer's port to name which one is gone and how: "refused" means
# its host answers but the process is gone, no answer means the host or the network is down.
# A rank that fails of its own accord (an error in its own code) first leaves its message (in the
# run directory and the process group's store), so the others say "rank R failed" rather than
# "lost", and do not requeue.
_PEERS: list[dict] = []
_FAILED_KEY = "recipe_dist/failed/"


def _local_address() -> str:
    """The address this host uses to reach MASTER_ADDR (the interface the ranks talk over)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "1"))))  # no packet is sent
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _serve_knocks(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
            conn.close()
        except OSError:
            return


def _meet_peers(info: DistInfo) -> None:
    global _PEERS
    if info.world_size == 1:
        _PEERS = []
        return
    import threading

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(16)
    threading.Thread(target=_serve_knocks, args=(listener,), name="recipe-dist-knock", daemon=True).start()
    me = {"rank": info.rank, "host": socket.gethostname(), "addr": _local_address(), "port": listener.getsockname()[1]}
    table: list = [None] * info.world_size
    dist.all_gather_object(table, me)
    _PEERS = table


def describe_world() -> str:
    """One line: where the ranks run and where they meet, e.g. for a multi-node job's log."""
    hosts = {p["host"] for p in _PEERS}
    where = ", ".join(f"rank {p['rank']} {p['host']} {p['addr']}" for p in _PEERS)
    return (f"cluster: {len(_PEERS)} ranks on {len(hosts)} node(s), rendezvous {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')}: {where}")


def peers() -> list[dict]:
    """Every rank's {rank, host, addr, port}, as gathered at start (empty for a world of one)."""
    return list(_PEERS)


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective or store operation that failed because a peer did not answer
    (gloo/NCCL read errors, resets, timeouts), not an error in this rank's own work."""
    if isinstance(e, dist.DistError):
        return True
    # gloo's errors name their source file (".../third_party/gloo/gloo/transport/tcp/pair.cc"), NCCL's say NCCL;
    # a reset from anything else (a storage read, say) is not a lost peer.
    return isinstance(e, RuntimeError) and any(k in str(e) for k in ("gloo", "NCCL", "c10d", "ProcessGroup"))


def knock(peer: dict, timeout: float = 3.0) -> str:
    """'alive', 'gone' (its host answers, nothing listens: the process died) or 'unreachable'."""
    try:
        with socket.create_connection((peer["addr"], peer["port"]), timeout=timeout):
            return "alive"
    except ConnectionRefusedError:
        return "gone"
    except OSError:
        return "unreachable"


def _others() -> list[dict]:
    me = dist.get_rank() if dist.is_initialized() else 0
    return [p for p in _PEERS if p["rank"] != me]


def _knock_all(others: list[dict]) -> dict[int, str]:
    """{rank: knock state} of `others`, all at once: a large world's dead node is many ranks."""
    from concurrent.futures import ThreadPoolExecutor

    if not others:
        return {}
    with ThreadPoolExecutor(max_workers=min(64, len(others))) as pool:
        return dict(zip((p["rank"] for p in others), pool.map(knock, others)))


def a_peer_is_lost() -> bool:
    """Whether any other rank's process or host no longer answers its knock: then an error this
    rank raised is a symptom of that loss (say, a collective whose error names neither gloo nor
    c10d, or data left half-received), not an error of its own. Live peers answer at once."""
    return any(state != "alive" for state in _knock_all(_others()).values())


def launcher_gone() -> bool:
    """Whether this rank's stdout or stderr lost its reader: the launcher holding the other end
    (slurmstepd, srun, torchrun's agent) is gone while this process lives on. Its next write
    raises BrokenPipeError, which is then a symptom of that loss, not an error of the rank's own
    (a requeue helps). A pipe whose readers all closed polls POLLERR, a socket or a hung-up
    terminal POLLHUP; a file or a live pipe never does."""
    import select

    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


FAILURES = ".failures"  # in the run directory: one note per rank that stopped on an error of its own


def report_own_failure(message: str, run_dir=None) -> None:
    """Leave this rank's error for the others (best effort, a few seconds at most): in the store,
    and, where the run has a directory (a shared filesystem, as checkpoints need), as a note in
    RUN_DIR/.failures/: the store lives in rank 0's process, so when rank 0 is the rank that
    failed, the note is what tells the others not to requeue."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank = dist.get_rank()
    if run_dir is not None:
        try:
            notes = os.path.join(run_dir, FAILURES)
            os.makedirs(notes, exist_ok=True)
            tmp = os.path.join(notes, f".rank{rank}.tmp")
            with open(tmp, "w") as f:
                f.write(message[:500])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(notes, f"rank{rank}.txt"))  # whole or absent, before this process exits
        except OSError:
            pass
    try:
        _bounded(lambda: _store().set(f"{_FAILED_KEY}{rank}", message[:500]))
    except Exception:  # the store's host may be the rank that is gone
        pass


STORE_WAIT_S = 3.0  # the most a failing rank waits on the store, whose host may be gone


def _store():
    """The process group's store (it lives in rank 0's process). Call it through `_bounded`."""
    from datetime import timedelta

    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=STORE_WAIT_S))
    return store


def _bounded(fn):
    """fn() on a daemon thread, waited for at most STORE_WAIT_S (TimeoutError after that).

    The store's own timeout bounds a wait for a key, not a read from a host that went silent:
    when rank 0's node loses power (no reset, no answer) a store call blocks in recv until TCP
    gives up, many minutes later, and the survivor would never name the lost peer or requeue.
    A thread left blocked is a daemon and does not hold the process at exit (cli.end_process)."""
    import threading

    box: dict = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=call, name="recipe-dist-store", daemon=True)
    t.start()
    t.join(STORE_WAIT_S)
    if t.is_alive():
        raise TimeoutError(f"the process group's store did not answer within {STORE_WAIT_S:g} s (its host, rank 0's, may be gone)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def clear_failure_notes(run_dir) -> None:
    """Rank 0, at a run's start: notes of an earlier attempt say nothing about this one."""
    import shutil

    shutil.rmtree(os.path.join(run_dir, FAILURES), ignore_errors=True)


def _failed_peers(candidates: list[dict], run_dir=None) -> dict[int, str]:
    """The ranks among `candidates` that reported an error of their own, with its message."""
    found: dict[int, str] = {}
    if run_dir is not None:
        for p in candidates:
            try:
                with open(os.path.join(run_dir, FAILURES, f"rank{p['rank']}.txt")) as f:
                    found[p["rank"]] = f.read()
            except OSError:
                continue
    if found:
        return found

    def ask() -> dict[int, str]:
        store = _store()
        return {p["rank"]: store.get(f"{_FAILED_KEY}{p['rank']}").decode(errors="replace")
                for p in candidates if store.check([f"{_FAILED_KEY}{p['rank']}"])}

    try:
        return _bounded(ask)
    except Exception:  # the store lives in rank 0's process: gone with it, or silent
        return {}


def diagnose(e: BaseException, run_dir=None) -> tuple[str, bool]:
    """(one line naming the peer(s) lost and how, whether a requeue can help) for a collective failure.

    A requeue helps when a peer was lost (node down, network cut, process killed from outside);
    it does not when a peer stopped on an error of its own, which a restart would only repeat."""
    others = _others()
    failed = _failed_peers(others, run_dir)
    if failed:  # no knocking needed: that rank said why it stopped
        r, msg = next(iter(failed.items()))
        short = msg if len(msg) <= 120 else msg[:117] + "..."
        return f"rank {r} stopped with an error of its own ({short}); not requeued: a restart would repeat it", False
    states = _knock_all(others)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # gloo's own words, less its source location and advice ("[.../pair.cc:545] Read error [addr]:port: ...")
    import re

    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first).split(". This is typically")[0]
    how = {"gone": "its process is gone (its host refuses)", "unreachable": "its host does not answer (node down or network cut)"}
    lost = [f"rank {p['rank']} on {p['host']} ({p['addr']}): {how[states[p['rank']]]}" for p in others if states[p["rank"]] != "alive"]
    if not lost:
        return f"a collective failed while every peer still answers ({first})", True
    return f"lost {'; '.join(lost)} [{first}]", True


@contextlib.contextmanager
def process_group(timeout_s: float | None = None):
    """`init_distributed` for the life of a `with` block, torn down however the block ends
    (`destroy_distributed`)."""
    try:
        yield init_distributed(timeout_s)
    finally:
        destroy_distributed()


def destroy_distributed() -> None:
    """Tear every process group down once the run is over, as torch asks. This does not stop
    gloo's worker threads (DeepSpeed still holds its groups), so a thread can be inside torch
    at interpreter exit and abort the process ("terminate called without an active exception",
    exit -6): the process entry ends without that teardown (cli.end_process)."""
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
