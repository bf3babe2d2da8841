"""report.md and its plots, from a synthetic TensorBoard log (no training)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from recipe_dist.report import ReportError, short_name, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NORMS = {  # param name -> (first, last) logged value
    "bert.encoder.layer.0.intermediate.dense.weight": (12.5, 6.25),
    "bert.encoder.layer.1.intermediate.dense.weight": (13.0, 3.25),
}


def _eval(acc, aasr, masr, per_trigger):
    return {"acc": acc, "aasr": aasr, "masr": masr, "asr_per_trigger": per_trigger,
            "asr": {t: {"0": v, "1": v / 2} for t, v in per_trigger.items()},
            "std": {"acc": 0.0, "aasr": 0.0, "masr": 0.0, "asr_per_trigger": {t: 0.0 for t in per_trigger}},
            "seeds": [42], "labels": ["0", "1"]}


EVALS = {
    "backdoored": _eval(91.87, 99.43, 99.91, {"cf": 99.91, "tq": 98.95}),
    "purified": _eval(90.61, 11.96, 14.37, {"cf": 14.37, "tq": 9.55}),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path_factory.mktemp("run")
    writer = SummaryWriter(log_dir=str(run / "tb"))
    steps = [10, 20, 30]
    for i, step in enumerate(steps):
        t = i / (len(steps) - 1)
        writer.add_scalar("train/loss_pt", 3.0 - t, step)
        writer.add_scalar("train/reg", 25.5 - 16 * t, step)
        writer.add_scalar("train/loss", 28.5 - 17 * t, step)
        writer.add_scalar("train/lr", 2e-5 * (1 - t), step)
        for name, (first, last) in NORMS.items():
            writer.add_scalar(f"reg/norm/{name}", first + (last - first) * t, step)
    writer.close()
    (run / "summary.json").write_text(json.dumps(
        {"steps": 30, "samples": 960, "wall_time_s": 12.3, "world_size": 2, "zero_stage": 2,
         "final_loss": 11.5, "final_loss_pt": 2.0, "final_reg": 9.5}))
    (run / "config.yaml").write_text("model:\n  family: bert\n  path: ''\n  regularized: []\nregularizer:\n  lam: 1.0\n  pt_weight: 1.0\n")
    return run


def _is_png(path):
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_MAGIC


def test_short_name():
    assert short_name("bert.encoder.layer.0.intermediate.dense.weight") == "layer 0 intermediate.dense"
    assert short_name("roberta.encoder.layer.11.attention.self.query.weight") == "layer 11 attention.self.query"
    assert short_name("blocks.3.mlp.fc1.weight") == "layer 3 mlp.fc1"
    assert short_name("features.0.weight") == "features.0"


def test_report_with_evals(run_dir):
    md_path = write_report(run_dir, EVALS, title="POR-BERT purification", notes=["pooler kept"])
    md = md_path.read_text()
    assert md_path == run_dir / "report.md"
    assert md.startswith("# POR-BERT purification") and "- pooler kept" in md
    assert "| world_size | 2 |" in md and "| zero_stage | 2 |" in md and "| λ | 1.0 |" in md
    # norms: first, last and their ratio per layer
    assert "| layer 0 intermediate.dense | 12.5000 (10) | 6.2500 (30) | 0.5000 |" in md
    assert "| layer 1 intermediate.dense | 13.0000 (10) | 3.2500 (30) | 0.2500 |" in md
    # evaluations: summary row per entry, ASR(t) per trigger
    assert "| backdoored | 91.87 | 99.43 | 99.91 |" in md
    assert "| purified | 90.61 | 11.96 | 14.37 |" in md
    assert "| tq | 98.95 | 9.55 |" in md
    for png in ("loss", "norms", "asr"):
        assert f"![{png}](report/{png}.png)" in md
        assert _is_png(run_dir / "report" / f"{png}.png")


def test_rerun_without_evals_drops_asr(run_dir):
    md = write_report(run_dir).read_text()
    assert "asr.png" not in md and not (run_dir / "report" / "asr.png").exists()
    assert _is_png(run_dir / "report" / "loss.png")


def test_attack_run_without_norms(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        for step in (1, 2):
            for part in ("l1", "l2", "l3", "loss"):
                writer.add_scalar(f"train/{part}", 1.0 / step, step)
    md = write_report(tmp_path).read_text()
    assert "![loss](report/loss.png)" in md and "report/norms.png" not in md and "‖W‖" not in md
    assert _is_png(tmp_path / "report" / "loss.png") and not (tmp_path / "report" / "norms.png").exists()


def test_no_tensorboard(tmp_path):
    md = write_report(tmp_path).read_text()
    assert f"no TensorBoard scalars found in {tmp_path / 'tb'}" in md


def test_invalid_eval_names_key(tmp_path):
    bad = {k: v for k, v in EVALS["purified"].items() if k != "aasr"}
    with pytest.raises(ValueError, match=r"evals\['purified'\]: missing key 'aasr'"):
        write_report(tmp_path, {"purified": bad})
    assert issubclass(ReportError, ValueError) and not (tmp_path / "report.md").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "recipe_dist", "report", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli(run_dir, tmp_path):
    for name, ev in EVALS.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(ev))
    proc = _cli(run_dir, "--eval", f"backdoored={tmp_path / 'backdoored.json'}",
                "--eval", f"purified={tmp_path / 'purified.json'}")
    assert proc.returncode == 0, proc.stderr
    assert "| purified | 90.61 | 11.96 | 14.37 |" in (run_dir / "report.md").read_text()
    assert _is_png(run_dir / "report" / "asr.png")

    missing = tmp_path / "no-such-run"
    proc = _cli(missing)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(missing) in proc.stderr


def test_a_resumed_runs_log_reads_back_without_the_orphaned_steps_or_a_restart_warning(tmp_path, capfd, caplog):
    """The interrupted run logged steps 10-40, its checkpoint was step 20, the resume logs 30-40
    again (SummaryWriter purge_step, as the trainer does): the reader keeps the resumed values and
    says nothing about "a TensorFlow restart"."""
    import logging
    import time

    from torch.utils.tensorboard import SummaryWriter

    from recipe_dist.metrics import read_scalars

    first = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for step in (10, 20, 30, 40):
        first.add_scalar("train/loss", 1.0, step)
    first.close()
    time.sleep(1.1)  # a new event file name (its name carries the second)
    resumed = SummaryWriter(log_dir=str(tmp_path / "tb"), purge_step=21)
    for step in (30, 40):
        resumed.add_scalar("train/loss", 2.0, step)
    resumed.close()
    with caplog.at_level(logging.INFO):
        scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0)]
    said = capfd.readouterr()
    assert "TensorFlow restart" not in said.out + said.err + caplog.text
