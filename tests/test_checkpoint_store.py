"""Checkpoint storage without processes (the fast lane): which checkpoint a resume may use.

A checkpoint is used only if its COMPLETE parses, names this run and lists every file with the
size and sha256 it had at save; anything else is skipped with one warning line naming it, resume
falls back to the newest one that verifies, and stops with one line when none does.
"""

import errno
import json
import os
from pathlib import Path

import pytest

from recipe_dist import checkpoint as ckpt

RUN = "run-a"


def _fake_checkpoint(root: Path, step: int, complete: bool = True, run_id: str = RUN) -> Path:
    """A checkpoint directory as store.save leaves it: files, then COMPLETE with their digests."""
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 64)
    (d / "rng_rank0.pt").write_bytes(b"rng" * 10)
    if complete:
        record = {"step": step, "run_id": run_id, "files": ckpt.file_digests(d)}
        (d / ckpt.COMPLETE).write_text(json.dumps({**record, "record_sha256": ckpt.store._record_digest(record)}))
    return d


def _warnings():
    lines = []
    return lines, lines.append


def test_prune_keeps_newest_complete_and_drops_garbage(tmp_path):
    for s in (2, 4, 6):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 3, complete=False)  # an old incomplete one (older version)
    (tmp_path / (ckpt.tag_for(8) + ckpt.PARTIAL)).mkdir()  # a save that died
    (tmp_path / (ckpt.tag_for(2) + ".trash")).mkdir()  # a delete that died
    ckpt.prune(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == [ckpt.tag_for(4), ckpt.tag_for(6)]
    with pytest.raises(ckpt.CheckpointError):
        ckpt.prune(tmp_path, keep=1)


def test_resume_ignores_incomplete_and_explicit_incomplete_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)
    (tmp_path / (ckpt.tag_for(8) + ckpt.PARTIAL)).mkdir()
    assert ckpt.resolve("auto", tmp_path, RUN) == (tmp_path, ckpt.tag_for(4))
    assert ckpt.resolve(str(tmp_path), tmp_path / "elsewhere") == (tmp_path, ckpt.tag_for(4))
    assert ckpt.resolve("auto", tmp_path / "none") is None
    with pytest.raises(ckpt.CheckpointError, match="COMPLETE is missing, empty or not valid JSON"):
        ckpt.resolve(str(tmp_path / ckpt.tag_for(6)), tmp_path)


@pytest.mark.parametrize("damage, why", [
    ("empty_complete", "not valid JSON"),
    ("garbled_complete", "not valid JSON"),
    ("flipped_byte", "mp_rank_00_model_states.pt does not match its sha256"),
    ("truncated", "mp_rank_00_model_states.pt is 100 bytes, 16384 when saved"),
    ("missing_file", "rng_rank0.pt is missing"),
    ("extra_file", "holds files COMPLETE does not list: stray.pt"),
    ("edited_meta", "does not match its sha256"),
    ("no_checksums", "lists no file checksums"),
    ("changed_lambda", "COMPLETE was changed after it was written"),
    ("foreign_renamed", "COMPLETE was changed after it was written"),
])
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, damage, why):
    _fake_checkpoint(tmp_path, 2)
    d = _fake_checkpoint(tmp_path, 4)
    model, complete = d / "mp_rank_00_model_states.pt", d / ckpt.COMPLETE
    meta = json.loads(complete.read_text())
    if damage == "empty_complete":
        complete.write_text("")
    elif damage == "garbled_complete":
        complete.write_bytes(complete.read_bytes()[:-1])  # one byte of COMPLETE lost
    elif damage == "flipped_byte":
        data = bytearray(model.read_bytes())
        data[5000] ^= 1
        model.write_bytes(bytes(data))
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "missing_file":
        (d / "rng_rank0.pt").unlink()
    elif damage == "extra_file":
        (d / "stray.pt").write_bytes(b"x")
    elif damage == "edited_meta":  # the recorded digest changed to fit other bytes: still caught
        model.write_bytes(b"y" * model.stat().st_size)
    elif damage == "no_checksums":
        complete.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("files", "record_sha256")}))
    elif damage == "changed_lambda":  # one byte of the saved config, still valid JSON
        complete.write_text(json.dumps({**meta, "config": {"regularizer": {"lam": 0.5}}}))
    elif damage == "foreign_renamed":  # another run's checkpoint whose COMPLETE was edited to name this run
        complete.write_text(json.dumps({**meta, "config": {"seed": 7}, "run_id": RUN}))
    lines, warn = _warnings()
    assert ckpt.find_resume(tmp_path, RUN, warn=warn) == ckpt.tag_for(2)
    assert len(lines) == 1 and str(d) in lines[0] and why in lines[0], lines
    if damage == "no_checksums":
        # Written by a recipe-dist older than verification: named explicitly, loaded with a warning.
        assert ckpt.resolve(str(d), tmp_path) == (tmp_path, d.name)
        return
    with pytest.raises(ckpt.CheckpointError, match=why):  # named explicitly: one line, no fallback
        ckpt.resolve(str(d), tmp_path)


def test_another_runs_checkpoint_is_never_adopted(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    foreign = _fake_checkpoint(tmp_path, 9, run_id="run-b")
    lines, warn = _warnings()
    assert ckpt.find_resume(tmp_path, RUN, warn=warn) == ckpt.tag_for(2) and not lines
    assert ckpt.verify(foreign, RUN).startswith("written by run run-b")


def test_when_no_checkpoint_verifies_resume_stops_instead_of_starting_over(tmp_path):
    d = _fake_checkpoint(tmp_path, 4)
    (d / ckpt.COMPLETE).write_text("")
    lines, warn = _warnings()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* verifies"):
        ckpt.find_resume(tmp_path, RUN, warn=warn)
    assert len(lines) == 1


def test_verified_tags_lists_every_good_checkpoint(tmp_path):
    for s in (2, 4, 6):
        _fake_checkpoint(tmp_path, s)
    (tmp_path / ckpt.tag_for(4) / "rng_rank0.pt").write_bytes(b"")
    lines, warn = _warnings()
    assert ckpt.verified_tags(tmp_path, RUN, warn) == [(6, ckpt.tag_for(6)), (2, ckpt.tag_for(2))]
    assert len(lines) == 1 and ckpt.tag_for(4) in lines[0]


def test_data_state_mismatch_is_refused():
    saved = {"seed": 42, "global_batch_size": 16, "num_samples": 384, "world_size": 2}
    ckpt.check_data_state(saved, {**saved, "world_size": 1}, Path("c"))  # a world-size change is allowed
    with pytest.raises(ckpt.CheckpointError, match="train.seed is 7 but c was written with 42"):
        ckpt.check_data_state(saved, {**saved, "seed": 7}, Path("c"))
    with pytest.raises(ckpt.CheckpointError, match="number of samples"):
        ckpt.check_data_state(saved, {**saved, "num_samples": 400}, Path("c"))


def test_full_disk_is_named_whatever_raised_it(tmp_path):
    assert "no space left on device" in ckpt._describe(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    # torch.save's zip writer hides the errno; a plain error on a roomy disk stays what it is.
    assert ckpt._describe(RuntimeError("unexpected pos 576 vs 534"), tmp_path).startswith("RuntimeError: unexpected pos")


def test_key_log_drops_records_past_the_resumed_step(tmp_path):
    from recipe_dist.trainer import KeyLog

    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "rank0.jsonl").write_text("".join(json.dumps({"step": s, "keys": []}) + "\n" for s in range(1, 6)) + '{"step": 6, "ke')
    (folder / "rank1.jsonl").write_text("".join(json.dumps({"step": s, "keys": []}) + "\n" for s in range(1, 6)))
    log = KeyLog(folder, rank=0, world_size=1, step=3)
    log.write(4, 0, 7, [{"__key__": "k"}])
    log.close()
    assert [json.loads(x)["step"] for x in (folder / "rank0.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in (folder / "rank1.jsonl").read_text().splitlines()] == [1, 2, 3]
