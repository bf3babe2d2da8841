"""A run directory's config.yaml and summary.json have one writer (`rundir.write_run_config`,
`rundir.write_summary`), atomic, shared by the trainer, prune and finemix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from recipe_dist import rundir
from recipe_dist.config import RunConfig, load_config
from recipe_dist.rundir import write_run_config, write_summary

PACKAGE = REPO / "recipe_dist"


def test_write_summary_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    write_summary(tmp_path, {"steps": 3, "samples": 96})
    before = (tmp_path / "summary.json").read_text()
    assert json.loads(before) == {"steps": 3, "samples": 96} and before.endswith("\n")

    # A value JSON cannot hold: refused before anything is opened.
    with pytest.raises(TypeError):
        write_summary(tmp_path, {"steps": object()})
    # A failure after the new text is written but before the rename (disk full, a signal).
    def boom(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        write_summary(tmp_path, {"steps": 4})
    monkeypatch.undo()
    monkeypatch.setattr(rundir.os, "replace", boom)
    with pytest.raises(OSError):
        write_summary(tmp_path, {"steps": 5})
    monkeypatch.undo()
    assert (tmp_path / "summary.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left behind

    write_summary(tmp_path, {"steps": 6})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 6}


def test_write_run_config_round_trips_and_is_atomic(tmp_path, monkeypatch):
    cfg = load_config(None, ["--optim.lr=3e-4", "--model.regularized=a,b", "--train.zero_stage=2"])
    write_run_config(tmp_path, cfg)
    assert load_config(str(tmp_path / "config.yaml"), []) == cfg
    before = (tmp_path / "config.yaml").read_text()
    monkeypatch.setattr(rundir.os, "replace", lambda *_: (_ for _ in ()).throw(OSError("interrupted")))
    with pytest.raises(OSError):
        write_run_config(tmp_path, RunConfig())
    assert (tmp_path / "config.yaml").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_the_trainer_and_the_defenses_write_through_the_shared_writers():
    for rel in ("trainer.py", "defenses/prune.py", "defenses/finemix.py"):
        src = (PACKAGE / rel).read_text()
        assert "write_run_config(" in src and "write_summary(" in src, rel
        for name in ("summary.json", "config.yaml"):
            assert f'"{name}").write_text' not in src, rel


def _classifier(tmp_path: Path, ptm: Path) -> Path:
    """A tiny classifier (untrained head) with labels "0"/"1", as evaluate --save_models writes one."""
    from recipe_dist.models import get_family

    model, tok = get_family("bert").build_classifier(ptm, ["0", "1"], RunConfig())
    out = tmp_path / "clf"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_finemix_writes_summary_json_beside_finemix_json(tmp_path, tiny_bert_dir):
    from recipe_dist.data import synthetic
    from recipe_dist.defenses import get_defense
    from recipe_dist.models import get_family

    clf = _classifier(tmp_path, tiny_bert_dir)
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in synthetic.sentiment(20, seed=1)))
    out = tmp_path / "fm"
    cfg = load_config(None, [f"--model.path={clf}", f"--output_dir={out}", f"--finemix.pretrained={tiny_bert_dir}",
                             f"--finemix.train_file={train}", "--finemix.finetune.epochs=1", "--finemix.finetune.batch_size=8",
                             "--finemix.finetune.max_length=32", "--finemix.epur_topn=3", "--finemix.finetune.lr=1e-3"])
    report = get_defense("finemix", get_family("bert")).run(cfg)
    assert (out / "finemix.json").is_file() and (out / "model").is_dir()
    assert load_config(str(out / "config.yaml"), []) == cfg
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 20  # ceil(20 / 8) steps, one epoch
    assert summary["tensors_mixed"] == report["mix"]["tensors_mixed"] and summary["epur_reset"] == 3
    assert summary["output_weights_sha256"] == report["output_weights_sha256"] and summary["world_size"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow  # a real CLI process: CI-only, to keep the fast lane under 2 minutes
def test_prune_summary_json_keeps_its_keys(tmp_path, tiny_bert_dir):
    out = tmp_path / "fp"
    run_cli(["prune", "--config", REPO / "configs" / "tiny-bert.yaml", "--model.path", tiny_bert_dir, "--output_dir", out,
             "--prune.variant=fp", "--data.synthetic_samples=64", "--train.global_batch_size=32", "--train.micro_batch_size=32"])
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "prune.json").read_text())
    keys = ("variant", "pruned", "samples", "wall_time_s", "world_size", "zero_stage", "output_weights_sha256")
    assert summary == {k: report[k] for k in keys}
    assert load_config(str(out / "config.yaml"), []).prune.variant == "fp"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
