"""Preemption: a signal asks the run to save and stop; under SLURM the job then requeues itself.

SLURM's `--signal=USR1@120` warns a job 120 s before its time limit, and preemption or
`scancel --signal=...` sends a signal too; some stacks swallow USR1 (NCCL), so TERM is handled as
well. The handler only sets a flag: everything else happens at a step boundary, where the flag is
all-reduced (MAX) so every rank stops after the same step. The trainer then saves an atomic
checkpoint through the usual path, rank 0 runs `scontrol requeue` for this job (or array task),
and every rank exits 0. The requeued job starts with `--resume auto` and continues from that
checkpoint, appending to the same log and TensorBoard directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

from .errors import RecipeError


class PreemptError(RecipeError):
    pass


class Preemption:
    def __init__(self, signals: list[str]):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for name in signals:
            sig = getattr(signal, "SIG" + name)
            self._previous[sig] = signal.signal(sig, self._handle)
        # Ctrl-C leaves a flag that the step loop checks (`interrupted`) and raises KeyboardInterrupt
        # at once outside it (`_interrupt`): Python drops a KeyboardInterrupt raised while the main
        # thread runs a finalizer (a generator closed by the garbage collector, a __del__), printing
        # "Exception ignored" with a traceback, and the run would go on to the end as if Ctrl-C had
        # never been pressed. Only where SIGINT still has Python's default handler, in the main
        # thread: a process started with SIGINT ignored (a background job of a non-interactive
        # shell) keeps ignoring it, as Python itself does.
        self.interrupt_pending = False
        self.deferring = False  # set by the trainer's step loop: Ctrl-C then stops at the next step boundary
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum, _frame) -> None:
        # Async-signal context: set the flag and return; the step loop acts on it. The first signal
        # names the stop: SLURM sends TERM to every task when the job requeues itself, which
        # arrives after the save and must not rename the USR1 that started it in the log line.
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    def _interrupt(self, signum, frame) -> None:
        # In the step loop the flag is enough (the loop raises KeyboardInterrupt at the next step
        # boundary, before that step's save, so nothing partial is written and no finalizer can
        # drop it); a second Ctrl-C, or one outside the loop (loading, export), raises at once.
        again, self.interrupt_pending = self.interrupt_pending, True
        if again or not self.deferring:
            raise KeyboardInterrupt

    def interrupted(self) -> bool:
        """Whether Ctrl-C was pressed (see __init__); the step loop raises KeyboardInterrupt on it."""
        return self.interrupt_pending

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, device) -> bool:
        """Whether any rank was signalled; one all-reduce (MAX of the signal number) at a step boundary."""
        if not dist.is_initialized():
            return self.requested
        number = signal.Signals[self.signal_name].value if self.requested else 0
        flag = torch.tensor([float(number)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.requested:
            self.requested, self.signal_name = True, signal.Signals(int(flag.item())).name
        return bool(flag.item())


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: <array job>_<task> for an array task, else the job id."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue(policy: str, max_requeues: int) -> str:
    """Requeue this SLURM job (one rank: rank 0 after a signal, a survivor after a lost peer); returns what was done, for the log line."""
    job = slurm_job_id()
    if policy == "never" or job is None:
        return "not running under SLURM: resubmit with --resume auto to continue" if job is None else "preempt.requeue=never: resubmit with --resume auto"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        raise PreemptError(f"job {job} was already requeued {restarts} times (preempt.max_requeues={max_requeues}); "
                           "not requeueing again: the checkpoint is saved, resubmit with --resume auto")
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise PreemptError(f"scontrol not found on PATH: cannot requeue job {job}; the checkpoint is saved, resubmit with --resume auto")
    proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        # Typically the job is already being requeued (an `scontrol requeue` from outside sent the
        # signal); SLURM brings it back either way. Say so rather than fail a saved run.
        msg = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        return f"scontrol requeue {job} did not succeed ({msg}); if the job does not come back, resubmit with --resume auto"
    return f"requeued SLURM job {job}"
