"""`recipe-dist demo` end to end on the smoke preset: every stage runs through the real CLI paths."""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow  # multi-process or end-to-end: outside the fast lane (pytest -m "not slow")


def test_demo_smoke_writes_table_json_and_report(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(["demo", "--output_dir", out, "--preset", "smoke"])
    assert "| backdoored |" in proc.stdout and "| purified |" in proc.stdout
    demo = json.loads((out / "demo.json").read_text())
    # The printed table and demo.json are the same numbers (the smoke preset's are meaningless, so
    # only their agreement is checked).
    for row in ("clean", "backdoored", "purified"):
        want = f"| {row} | " + " | ".join(f"{demo[row][k]:.2f}" for k in ("acc", "aasr", "masr")) + " |"
        assert want in proc.stdout.splitlines(), (want, proc.stdout[-2000:])
    assert demo["meta"]["synthetic"] is True
    # The stages went through the real attack / purify paths: configs, checkpoints, TensorBoard, export.
    for stage in ("attack", "purify"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
        assert (out / stage / "model" / "model.safetensors").is_file()
        assert any((out / stage / "checkpoints").glob("step_*/COMPLETE"))
        assert list((out / stage / "tb").glob("events.out.tfevents.*"))
        assert (out / stage / "report.md").is_file()  # purify and attack write their own report too
    assert (out / "ptm" / "SYNTHETIC.md").is_file() and (out / "task" / "SYNTHETIC.md").is_file()
    report = (out / "report.md").read_text()
    # (the smoke preset's classifiers are degenerate: report.md rightly marks them INVALID)
    assert "SYNTHETIC" in report and "| backdoored" in report
    # Image links in the top-level report resolve to real PNGs in the purify run.
    for link in ("purify/report/loss.png", "purify/report/norms.png", "purify/report/asr.png"):
        assert f"]({link})" in report, link
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_unknown_preset_is_a_one_line_error(tmp_path):
    proc = run_cli(["demo", "--output_dir", tmp_path / "d", "--preset", "huge"], check=False)
    assert proc.returncode == 2
    assert "huge" in proc.stderr
