"""`recipe-dist bench defense`: every row runs on the smoke preset; the pooler-reset row really drops the pooler."""

import json

import torch
from safetensors import safe_open

from conftest import run_cli
from recipe_dist.bench.defense import drop_pooler


def test_drop_pooler_gives_a_fresh_pooler_downstream(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = drop_pooler(tiny_bert_dir, tmp_path / "reset")
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        keys = list(h.keys())
    assert keys and not any("pooler" in k for k in keys)
    torch.manual_seed(0)
    a = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    b = AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=2)
    assert not torch.equal(a.bert.pooler.dense.weight, b.bert.pooler.dense.weight)
    assert torch.equal(a.bert.encoder.layer[0].intermediate.dense.weight, b.bert.encoder.layer[0].intermediate.dense.weight)


def test_bench_defense_smoke_has_every_row(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out])
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert list(rows) == ["clean PTM", "backdoored, no defense", "RECIPE (lambda=1)", "only L_PT (lambda=0)",
                          "only regularizer (no L_PT)", "pooler reset only", "RECIPE lambda=0.5", "RECIPE on the clean PTM"]
    assert "| RECIPE (lambda=1) |" in proc.stdout
    # The ablations really ran with their settings.
    assert "lam: 0.0" in (out / "configs" / "purify-lam0.yaml").read_text()
    assert "pt_weight: 0.0" in (out / "configs" / "purify-regonly.yaml").read_text()
    # A second run reuses every finished stage.
    again = run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out])
    assert "recipe-dist purify" not in again.stdout and "reusing" in again.stdout
