"""A run directory belongs to one run: ownership, an OS-level lock, a run id and the config history.

- A fresh run (no `resume`) refuses an `output_dir` that already holds files, naming the three
  ways on: `--resume auto`, another directory, or `--overwrite=true`, which renames the old
  directory aside to `<output_dir>.replaced-<UTC time>` in one atomic rename (nothing is deleted).
- Rank 0 holds `fcntl.flock` on `<output_dir>/.lock` for the whole run. The kernel drops the lock
  when the process dies, however it dies, so a crash never leaves a stale lock behind; a second
  run on the same directory while the first one lives refuses with one line.
- `RUN_ID` names the run. Every checkpoint's COMPLETE carries it, and `--resume auto`, `latest`
  and pruning only consider checkpoints of this run.
- On resume, the config is compared with the checkpoint's (`check_resume_config`): a change to
  anything that changes the result is refused with both values; the keys in `MAY_CHANGE` may
  change and each change is appended to `config_history.jsonl`.
- `config.yaml` (the resolved config, written when the run starts) and `summary.json` (written
  when it has finished: what the lab, `slurm status` and the report read) have one writer each,
  `write_run_config` and `write_summary`, shared by the trainer, prune and finemix. Both replace
  the file atomically: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from .config import dump_yaml
from .errors import RecipeError

LOCK = ".lock"
RUN_ID = "RUN_ID"
HISTORY = "config_history.jsonl"

# Keys that do not change what the run computes: where it writes, when it stops and saves, how it
# logs, how storage is reached. Anything else differing from the checkpoint's config is refused.
MAY_CHANGE = (
    "output_dir", "resume", "overwrite", "preempt.signals", "preempt.requeue", "preempt.max_requeues",
    "preempt.collective_timeout",
    "train.stop_at_step", "train.log_every",
    "checkpoint.every_steps", "checkpoint.keep",
    # the world size may change on resume (checkpoint.WORLD_SIZE_CHANGE); the micro batch with it
    "train.micro_batch_size",
    # any ZeRO stage to any other, the AdamW state converted (checkpoint/stages.py; a user short
    # of memory moves a long job to ZeRO-3, or back)
    "train.zero_stage",
    # the same shards reached another way; the sample count is checked separately (check_data_state)
    "data.train_urls", "data.endpoint_url", "data.retries", "data.retry_backoff", "data.io_timeout", "data.record_keys",
    # the same mathematics to fp32 rounding (tests/test_kernels.py)
    "kernels.fused", "kernels.chunk_size",
    # how far ahead shards are fetched; the samples and their order are the same
    "data.prefetch_shards", "data.prefetch_max_mb", "data.prefetch_batches",
)

# Keys that may change between some values only: (allowed(old, new), why not otherwise).
MAY_CHANGE_IF: dict = {}



class RunDirError(RecipeError):
    """The output directory cannot be used for this run; the message names it."""


class RunDir:
    """Rank 0's claim on `output_dir` for the life of the process (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.run_id = ""

    def claim(self, fresh: bool, overwrite: bool) -> str:
        """Lock the directory and settle the run id; returns it. Raises RunDirError."""
        out = self.path
        if fresh and overwrite and out.exists() and _entries(out):
            aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            # The old directory's lock first: a run still alive in it keeps its directory (moving
            # it would pull the files from under a live run). Held through the rename, released after.
            old_fd = self._lock(out)
            try:
                # One rename: the old run stays whole under its new name, and a second run racing
                # for the same directory will find it absent or already moved.
                os.rename(out, aside)
            except OSError as e:
                raise RunDirError(f"output_dir: cannot move {out} aside to {aside}: {e.strerror}") from None
            finally:
                os.close(old_fd)
            print(f"output_dir: moved the previous contents of {out} to {aside}", flush=True)
        fd = self._lock(out)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            if fresh and _entries(out) and _failed_start(out):
                # Left by a run that stopped before its first checkpoint (a missing model, a full
                # disk, a bad key): nothing in it can be resumed or reported, so the corrected
                # retry takes the directory over instead of being refused as another run's.
                print(f"output_dir: {out} holds only the files of a run that stopped before its first checkpoint; "
                      f"replacing them ({', '.join(sorted(_entries(out))[:4])})", flush=True)
                for name in _entries(out):
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
            existing = (out / RUN_ID).read_text().strip() if (out / RUN_ID).is_file() else ""
            if fresh and _entries(out):
                raise RunDirError(
                    f"output_dir: {out} already holds another run's files ({', '.join(sorted(_entries(out))[:4])}); "
                    "continue it with --resume auto, choose a new output_dir, or pass --overwrite=true to move it aside"
                )
            self.run_id = existing or uuid.uuid4().hex
            if not existing:
                _write(out / RUN_ID, self.run_id + "\n")
        except BaseException:
            self.release()
            raise
        return self.run_id

    @staticmethod
    def _lock(out: Path) -> int:
        """An open descriptor of out/.lock holding its flock (the directory made if needed)."""
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"output_dir: cannot write {out}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = (os.pread(fd, 64, 0).decode(errors="replace").split() or ["unknown"])[0]
            os.close(fd)
            raise RunDirError(f"output_dir: {out} is in use by another run (process {holder}); wait for it or choose another output_dir") from None
        return fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None


def _failed_start(out: Path) -> bool:
    """Whether `out` holds only what a run of ours leaves before its first complete checkpoint:
    its RUN_ID, and no checkpoint, model, summary or report (and nothing we did not write)."""
    ours = {RUN_ID, "config.yaml", "config_history.jsonl", "progress.json", ATTEMPTS, ".failures", "tb", "keys", "input_model", "checkpoints", "data",
            "model.partial"}
    entries = _entries(out)
    if RUN_ID not in entries or not entries <= ours:
        return False
    return not any((out / "checkpoints").glob("step_*/COMPLETE"))


def _entries(path: Path) -> set[str]:
    """Names in `path` that belong to a run (the lock file alone does not)."""
    try:
        return {p.name for p in path.iterdir()} - {LOCK}
    except FileNotFoundError:
        return set()


def _write(path: Path, text: str, durable: bool = False) -> None:
    """Replace `path` by `text` atomically: a temporary file in the same directory (so the rename
    stays on one filesystem), then os.replace. A failure leaves the old file as it was and no
    temporary behind. `durable` also syncs the data to disk before the rename, so a crash of the
    machine cannot leave the new name on empty contents."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_run_config(out: Path, cfg) -> None:
    """OUTPUT_DIR/config.yaml: the resolved config of the run (rank 0, when the run starts)."""
    _write(Path(out) / "config.yaml", dump_yaml(cfg), durable=True)


def write_summary(out: Path, summary: dict) -> None:
    """OUTPUT_DIR/summary.json: what a finished run reports (rank 0, once the model is written)."""
    # Serialized before anything is opened: a value JSON cannot hold fails with the old file intact.
    _write(Path(out) / "summary.json", json.dumps(summary, indent=2) + "\n", durable=True)


def write_dir_aside(target: Path, write) -> dict[str, str]:
    """Run `write(partial)` to fill `<target>.partial/`, then rename it to `target`: a crash, a full
    disk or an unwritable mount midway leaves no half-written `target` that looks finished.
    Returns {relative path: sha256} of every file written (taken before the rename). An OSError
    becomes one line naming `target`; the caller's earlier outputs (checkpoints) are untouched."""
    from .checkpoint.store import file_digests

    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
        digests = {name: sha for name, (_, sha) in file_digests(partial).items()}
        if target.exists():
            shutil.rmtree(target)  # a rerun after a crash right after the rename, before the summary
        os.rename(partial, target)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        why = "no space left on device" if e.errno == 28 else (e.strerror or type(e).__name__)
        raise RecipeError(f"cannot write {target}: {why}{f' ({e.filename})' if e.filename else ''}") from None
    return digests


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Keys added after runs were recorded without them, and the value their absence meant.
LEGACY = {"attack.por_l1_rows": "clean"}


def check_resume_config(saved: dict | None, now: dict, where: Path) -> dict:
    """Refuse a resume whose config changes the result; return {key: [saved, now]} of allowed changes."""
    if not saved:
        return {}  # a checkpoint written before configs were recorded: nothing to compare
    old, new = _flatten(saved), _flatten(now)
    allowed = {}
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and old[key] == new[key]:
            continue
        if key not in old and key in LEGACY and LEGACY[key] != new.get(key):
            # a key added later whose absence meant a behaviour (e.g. POR's L1 on clean rows only)
            raise RunDirError(f"resume: {key} is {new[key]!r} but {where} was trained before it existed, which means "
                              f"{LEGACY[key]!r}; resume with --{key}={LEGACY[key]}")
        if key not in old or key not in new:
            continue  # a key added or removed by a newer version of recipe-dist: no value to compare
        if key in MAY_CHANGE:
            allowed[key] = [old[key], new[key]]
            continue
        if key in MAY_CHANGE_IF:
            ok, why = MAY_CHANGE_IF[key]
            if ok(old[key], new[key]):
                allowed[key] = [old[key], new[key]]
                continue
            raise RunDirError(f"resume: {key} is {new[key]!r} but {where} was trained with {old[key]!r}: {why}")
        raise RunDirError(
            f"resume: {key} is {new[key]!r} but {where} was trained with {old[key]!r}; a resumed run must keep every "
            f"setting that changes the result (start a new run in a new output_dir, or resume with --{key}={old[key]})"
        )
    return allowed


def finished_summary(out: Path, now: dict) -> dict | None:
    """summary.json of a run in `out` that already finished with the config `now` (up to keys in
    MAY_CHANGE), else None. A resume of it has nothing left to do and must change nothing: not
    re-export the model, not rewrite the summary without its final losses (slurm run-task always
    passes --resume auto, so a requeued finished job lands here)."""
    out = Path(out)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "output_weights_sha256" not in summary or not (out / "model").is_dir():
        return None
    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())  # written by write_run_config
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    check_resume_config(saved, now, out)  # a change that alters the result is refused as on any resume
    return summary


def record_history(out: Path, step: int, changes: dict) -> None:
    """Append one line to config_history.jsonl: what changed on this resume, at which step."""
    if not changes:
        return
    with open(out / HISTORY, "a") as f:
        f.write(json.dumps({"resumed_at_step": step, "time": time.time(), "changes": changes}) + "\n")


ATTEMPTS = "attempts.jsonl"


def record_attempt(out: Path, event: str, **fields) -> None:
    """Append one line to attempts.jsonl: a start of the run (which job, nodes, from which step)
    or how it ended. `recipe-dist slurm status` shows them as the job's history; a start with no
    end line is an attempt that was killed outright (its node died, SIGKILL)."""
    from .preempt import slurm_job_id

    record = {"event": event, "time": time.time(), "job": slurm_job_id(), "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
              "host": socket.gethostname(), **fields}
    with open(out / ATTEMPTS, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_progress(out: Path, step: int, total_steps: int, steps_per_second: float) -> None:
    """progress.json: the last logged step, the run's length and its recent speed (rank 0, log steps)."""
    _write(out / "progress.json", json.dumps({"step": step, "total_steps": total_steps, "steps_per_second": steps_per_second,
                                              "time": time.time()}) + "\n")
