"""End to end through the real CLI and launch script: 2 gloo ranks, export, TensorBoard, resume."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow  # multi-process or end-to-end: outside the fast lane (pytest -m "not slow")

TINY = REPO / "configs" / "tiny-bert.yaml"
SMALL = ["--data.synthetic_samples=384", "--train.micro_batch_size=8", "--train.global_batch_size=16", "--train.log_every=2"]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    proc = run_cli(["purify", "--config", TINY, "--output_dir", out, "--train.zero_stage=2",
                    "--checkpoint.every_steps=5", *SMALL, "--train.log_every=1"], nproc=2)
    return out, proc


def test_outputs_layout_and_summary(run2):
    out, _ = run2
    for name in ("model/model.safetensors", "model/config.json", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 384 // 16 and s["samples"] == s["steps"] * 16 and s["world_size"] == 2
    assert s["final_loss_pt"] > 0 and s["final_reg"] > 0 and s["wall_time_s"] > 0
    assert s["input_weights_sha256"] != s["output_weights_sha256"]
    # keep=2: only the two newest complete checkpoints survive, and `latest` names the newest.
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tags == ["step_00000020", "step_00000024"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000024"


def test_export_loads_with_no_missing_input_keys(run2):
    from transformers import AutoModel, AutoModelForMaskedLM

    out, _ = run2
    with safe_open(str(out / "input_model" / "model.safetensors"), "pt") as f:
        input_keys = set(f.keys())
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert input_keys <= set(f.keys())
    mlm, info = AutoModelForMaskedLM.from_pretrained(str(out / "model"), output_loading_info=True)
    assert not info["missing_keys"]
    base, info = AutoModel.from_pretrained(str(out / "model"), output_loading_info=True)
    assert not info["missing_keys"]  # the pooler is there
    # Only the regularized FFN-in weights trained (BERT family policy); they shrank, the rest is unchanged.
    before, after = load_file(str(out / "input_model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    for k in input_keys:
        if k.endswith("intermediate.dense.weight"):
            assert after[k].norm() < before[k].norm(), k
        else:
            assert torch.equal(before[k], after[k]), k


def test_tensorboard_tags(run2):
    from recipe_dist.metrics import read_scalars

    out, _ = run2
    scalars = read_scalars(out / "tb")
    for tag in ("train/loss_pt", "train/reg", "train/loss", "train/lr", "train/samples_per_second"):
        assert tag in scalars, tag
    norms = [t for t in scalars if t.startswith("reg/norm/")]
    assert sorted(norms) == [f"reg/norm/bert.encoder.layer.{i}.intermediate.dense.weight" for i in range(2)]
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == list(range(1, 25))
    # With one micro-batch per logged step, reg is exactly the sum of the per-layer norms.
    last_reg = scalars["train/reg"][-1][1]
    assert last_reg == pytest.approx(sum(scalars[t][-1][1] for t in norms), rel=1e-4)


def test_resume_is_bit_identical(tmp_path):
    common = ["purify", "--config", TINY, "--train.zero_stage=1", "--data.num_workers=1",
              "--checkpoint.every_steps=4", *SMALL]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli([*common, "--output_dir", straight], nproc=2)
    first = run_cli([*common, "--output_dir", resumed, "--train.stop_at_step=9"], nproc=2)
    assert "stopped at step 9/24" in first.stdout
    assert not (resumed / "model").exists()
    second = run_cli([*common, "--output_dir", resumed, "--resume", "auto"], nproc=2)
    assert "at step 9" in second.stdout
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 24
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, changed
