"""Storing checkpoints: atomic DeepSpeed saves, finding complete ones, keep-last-K, safe reads.

Resuming (which checkpoint, on which world size) is in resume.py; the trainer talks to both
through the Checkpointer (manager.py).

Layout under `<output_dir>/checkpoints/`:
  step_00000100/            a complete checkpoint: DeepSpeed's files, rng_rank<r>.pt per rank and
                            COMPLETE (JSON: run id, step, world size, ZeRO stage, data state, config
                            and the size and sha256 of every other file in the directory)
  step_00000100.partial/    a save in progress, or one that died: never loaded, removed by the
                            next save and by pruning
  universal/step_00000100/  DeepSpeed's universal form of a ZeRO 1-3 checkpoint, made when a run
                            resumes it on a different number of ranks
  latest                    the newest complete tag, replaced atomically (os.replace)

A save runs in this order: every rank writes into step_N.partial/; every rank reports whether its
writes succeeded (one collective, which is also the barrier); rank 0 writes COMPLETE, renames the
directory to step_N (an atomic rename), replaces `latest` and prunes. A process killed at any
point leaves the older checkpoints untouched and, at worst, a .partial directory. DeepSpeed's own
`latest` is written by rank 0 while other ranks may still be writing, so it is never written or
read; `--resume auto` scans the step_N directories from the newest down to the first one that
verifies: its COMPLETE parses, names this run, and every file it lists has the recorded size and
sha256 (a truncated file, a flipped byte, a COMPLETE edited or copied in from another run). Each one
skipped is named in one warning line; when checkpoints of the run exist and none verifies, resume
stops rather than start over.

A save that fails on any rank (a full disk, say) fails on every rank with one message; the
.partial directory is removed and the previous complete checkpoint is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import barrier, broadcast_object
from ..errors import RecipeError

TAG_RE = re.compile(r"^step_(\d{8})$")
# step_N.partial (a save in progress or abandoned), step_N.trash (being deleted): never loadable.
GARBAGE_RE = re.compile(r"^step_\d{8}\.")
COMPLETE = "COMPLETE"
PARTIAL = ".partial"
UNIVERSAL = "universal"
# torch.save reports a full disk as a bare RuntimeError from its zip writer, so a failed write with
# less than this left on the device is reported as "no space left".
_NEARLY_FULL = 16 << 20


class CheckpointError(RecipeError, RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------ RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), np_state[2], np_state[3], np_state[4]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ finding checkpoints


def read_meta(path: Path) -> dict | None:
    """The COMPLETE record of checkpoint directory `path`; None if there is none or it does not
    parse as a JSON object (an empty or damaged COMPLETE makes nothing complete)."""
    try:
        meta = json.loads((path / COMPLETE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def file_digests(path: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `path` but COMPLETE."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != COMPLETE:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            out[f.relative_to(path).as_posix()] = [f.stat().st_size, h.hexdigest()]
    return out


def _record_digest(record: dict) -> str:
    """sha256 of a COMPLETE record's own content (its `record_sha256` aside), so that an edit that
    still parses (a changed lambda in the saved config, another run id) is caught too."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify(path: Path, run_id: str = "") -> str | None:
    """Why checkpoint directory `path` cannot be used (None when it verifies): its COMPLETE must
    parse, name run `run_id` (when given), and list every file with its size and sha256."""
    meta = read_meta(path)
    if meta is None:
        return f"{COMPLETE} is missing, empty or not valid JSON"
    if meta.get("record_sha256") != _record_digest(meta):
        return f"{COMPLETE} was changed after it was written (its record_sha256 does not match)" if "record_sha256" in meta else \
            f"{COMPLETE} lists no file checksums (written before recipe-dist verified checkpoints)"
    if run_id and meta.get("run_id") != run_id:
        return f"written by run {meta.get('run_id') or '(none recorded)'}, not this run ({run_id})"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"{COMPLETE} lists no file checksums (written before recipe-dist verified checkpoints)"
    on_disk = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file() and f.name != COMPLETE}
    if on_disk - set(files):
        return f"holds files {COMPLETE} does not list: {', '.join(sorted(on_disk - set(files))[:3])}"
    for name, (size, _) in files.items():  # sizes first: a truncated file is found without hashing
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} when saved (truncated or replaced)"
    digests = file_digests(path)
    bad = next((n for n, (_, sha) in files.items() if digests[n][1] != sha), None)
    return f"{bad} does not match its sha256 recorded at save (the file changed after it was written)" if bad else None


def complete_tags(root: Path, run_id: str = "") -> list[tuple[int, str]]:
    """(step, tag) of checkpoints whose COMPLETE parses (of run `run_id` when given), newest
    first; their files are not hashed here (see `verified_tags`)."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if m and (meta := read_meta(d)) is not None:
            if run_id and meta.get("run_id") != run_id:
                continue
            found.append((int(m.group(1)), d.name))
    return sorted(found, reverse=True)


def written_before_verification(path: Path) -> bool:
    """Whether `path` is a complete checkpoint of a recipe-dist older than verification: its
    COMPLETE parses but records neither file digests nor its own."""
    meta = read_meta(path)
    return meta is not None and "record_sha256" not in meta and "files" not in meta


def _damaged(root: Path, run_id: str) -> list[tuple[int, str]]:
    """(step, tag) of directories with a COMPLETE file that is not another run's valid record."""
    out = []
    for d in root.iterdir() if root.is_dir() else ():
        m = TAG_RE.match(d.name)
        if m and (d / COMPLETE).is_file():
            meta = read_meta(d)
            if meta is None or not run_id or meta.get("run_id") == run_id:
                out.append((int(m.group(1)), d.name))
    return sorted(out, reverse=True)


def verified_tags(root: Path, run_id: str = "", warn=None, first_only: bool = False) -> list[tuple[int, str]]:
    """(step, tag) of checkpoints that verify (see `verify`), newest first; `warn(line)` hears of
    each one skipped. With `first_only`, stop at the newest that verifies."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))  # seen even with stdout redirected
    out = []
    for step, tag in _damaged(root, run_id):
        why = verify(root / tag, run_id)
        if why:
            warn(f"[recipe-dist] warning: skipping checkpoint {root / tag}: {why}")
            continue
        out.append((step, tag))
        if first_only:
            break
    return out


def find_resume(root: Path, run_id: str = "", warn=None) -> str | None:
    """The newest checkpoint tag (of run `run_id`) that verifies; None when the run has none at
    all. When it has some and none verifies, raises: starting over would hide the damage."""
    good = verified_tags(root, run_id, warn, first_only=True)
    if good:
        return good[0][1]
    damaged = _damaged(root, run_id)
    if damaged:
        legacy = [tag for _, tag in damaged if written_before_verification(root / tag)]
        hint = (f"; {root / legacy[0]} was written before recipe-dist verified checkpoints: --resume {root / legacy[0]} "
                "loads it unverified") if legacy else ""
        raise CheckpointError(f"resume: no checkpoint in {root} verifies (each is named above); "
                              f"move the directory aside to start over, or pass --resume with a good checkpoint{hint}")
    return None


def resolve(resume: str, own_root: Path, run_id: str = "") -> tuple[Path, str] | None:
    """(checkpoints root, tag) that `--resume` names, or None to start fresh.

    'auto' is the newest complete checkpoint of this run (None if it has none). A path is either
    one checkpoint (step_N/) or a checkpoints directory, whose newest complete one is taken.
    """
    if not resume:
        return None
    if resume == "auto":
        tag = find_resume(own_root, run_id)
        return (own_root, tag) if tag else None
    path = Path(resume)
    if TAG_RE.match(path.name):
        why = verify(path)
        if why and written_before_verification(path):
            # A run started by an older recipe-dist: its checkpoints carry no digests to check.
            # Named explicitly, it is loaded (through the same weights-only loader), with a warning;
            # `--resume auto` never picks one by itself.
            print(f"[recipe-dist] warning: {path}: {why}; loading it unverified because --resume names it", file=sys.stderr, flush=True)
            return path.parent, path.name
        if why:
            raise CheckpointError(f"resume: {path} cannot be used: {why}; pick an older step_* directory")
        return path.parent, path.name
    tag = find_resume(path)
    if tag is None:
        raise CheckpointError(f"resume: no complete checkpoint (step_*/{COMPLETE}) in {path}")
    return path, tag


# ------------------------------------------------------------------ saving


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _describe(exc: BaseException, where: Path) -> str:
    """A one-line reason for a failed write; a full disk is named as such whatever raised it."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    free = _free_bytes(where)
    full = any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in chain)
    full = full or any("No space left" in str(c) for c in chain) or (free is not None and free < _NEARLY_FULL)
    if full:
        return f"no space left on device under {where} ({free if free is not None else '?'} bytes free)"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _gather(failure: str | None) -> list[str | None]:
    """Every rank's failure (None where its writes succeeded). All ranks must call it."""
    if not dist.is_initialized():
        return [failure]
    out: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, failure)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write `path` through a temporary file and os.replace: readers see the old or the new text."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed first, so a crash mid-delete leaves garbage, never a
    complete-looking checkpoint with files missing."""
    if not path.exists():
        return
    trash = path
    if not GARBAGE_RE.match(path.name):
        trash = path.with_name(path.name + ".trash")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save(engine, root: Path, step: int, client_state: dict, keep: int, rank: int, meta: dict | None = None) -> str:
    """See `_save`; a save interrupted on rank 0 (Ctrl-C, an exception) removes its .partial directory."""
    try:
        return _save(engine, root, step, client_state, keep, rank, meta)
    except BaseException:
        if rank == 0:
            shutil.rmtree(root / (tag_for(step) + PARTIAL), ignore_errors=True)
        raise


def _save(engine, root: Path, step: int, client_state: dict, keep: int, rank: int, meta: dict | None = None) -> str:
    """Write checkpoint step_N atomically (see the module docstring); every rank calls it.

    `meta` goes into COMPLETE next to the step; resume reads it before building the engine.
    Raises CheckpointError on every rank when any rank's writes fail.
    """
    tag = tag_for(step)
    partial = root / (tag + PARTIAL)
    run_id = (meta or {}).get("run_id", "")
    newest = complete_tags(root, run_id) if rank == 0 else []
    previous = newest[0][1] if newest else None
    failure = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for d in root.iterdir():  # a save that died earlier: free its space before writing
                if GARBAGE_RE.match(d.name):
                    shutil.rmtree(d, ignore_errors=True)
            partial.mkdir()
        except OSError as e:
            failure = f"rank 0: {_describe(e, root)}"
    failures = _gather(failure)
    if not any(failures):
        try:
            engine.save_checkpoint(str(root), tag=partial.name, client_state=client_state, save_latest=False)
        except Exception as e:
            failure = f"rank {rank}: {_describe(e, root)}"
            # DeepSpeed's save ends in a barrier, where the ranks whose writes succeeded now wait;
            # the writes come after its other collectives, so this rank joins that barrier here.
            barrier()
        if failure is None:
            try:
                torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
            except Exception as e:
                failure = f"rank {rank}: {_describe(e, root)}"
        failures = _gather(failure)
    if rank == 0 and not any(failures):
        try:
            for f in partial.rglob("*"):
                if f.is_file():
                    _fsync(f)
            # Sizes and digests of what is on disk now (just written, so read from the page cache):
            # resume uses the checkpoint only if every file still matches.
            record = {**(meta or {}), "step": step, "time": time.time(), "files": file_digests(partial)}
            _write_durably(partial / COMPLETE, json.dumps({**record, "record_sha256": _record_digest(record)}))
            if (root / tag).exists():  # this step was saved before, by a run resumed from an older checkpoint
                other = (read_meta(root / tag) or {}).get("run_id")
                if other and other != run_id:
                    print(f"[recipe-dist] warning: replacing {root / tag}, a checkpoint of another run ({other}) "
                          "that was in this run's checkpoints/", file=sys.stderr, flush=True)
                _remove(root / tag)
            os.rename(partial, root / tag)
            _fsync(root)
            _write_durably(root / "latest", tag)
        except OSError as e:
            failures[0] = f"rank 0: {_describe(e, root)}"
    failures, previous = broadcast_object((failures, previous))
    if any(failures):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        kept = f"the previous complete checkpoint {root / previous} is intact" if previous else "no earlier complete checkpoint exists"
        first = next(f for f in failures if f)
        raise CheckpointError(f"checkpoint {tag} was not saved: {first}; {kept}")
    if rank == 0:
        prune(root, keep, run_id)
    return tag


def prune(root: Path, keep: int, run_id: str = "") -> None:
    """Keep the newest `keep` complete checkpoints (of run `run_id`); drop older ones and leftovers
    of failed saves. The newest complete checkpoint is always among those kept, so it is never
    the one deleted; another run's checkpoints are never touched.
    """
    if keep < 2:
        raise CheckpointError("checkpoint.keep must be >= 2")
    complete = complete_tags(root, run_id)
    if not complete:
        return
    survivors = {tag for _, tag in complete[:keep]}
    newest = complete[0][0]
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if GARBAGE_RE.match(d.name):
            shutil.rmtree(d, ignore_errors=True)
        elif m and d.name not in survivors and run_id and (read_meta(d) or {}).get("run_id", run_id) != run_id:
            continue  # another run's checkpoint
        elif m and d.name not in survivors and ((d / COMPLETE).is_file() or int(m.group(1)) < newest):
            _remove(d)  # an old complete one, or an incomplete one written by an older version
    for converted in (root / UNIVERSAL, root / "zero0"):  # conversions for another world size or ZeRO stage (resume.py)
        if converted.is_dir():
            for d in converted.iterdir():
                if d.name not in survivors:
                    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ reading untrusted files


def _allowed_globals() -> list:
    """The non-tensor types DeepSpeed's checkpoint files hold (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Inside the block every `torch.load` (DeepSpeed's own, which pass weights_only=False, and
    ds_to_universal's) unpickles with weights_only=True plus the allow-list above: a checkpoint
    directory from someone else can hold tensors and plain containers, never code to run.
    A file with anything else is refused with one line naming it."""
    import pickle

    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
            raise CheckpointError(f"resume: {f} holds Python objects that are not tensors or types DeepSpeed writes; "
                                  f"refusing to unpickle it ({why[:160]})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
