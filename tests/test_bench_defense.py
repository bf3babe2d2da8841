"""`recipe-dist bench defense`: every row runs on the smoke preset; the pooler-reset row really drops the pooler."""

import json
import shutil

import pytest

import torch
from safetensors import safe_open

from conftest import run_cli
from recipe_dist.lab.defense import drop_pooler


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


@pytest.mark.slow
def test_bench_defense_smoke_has_every_row(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out])
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["clean", "backdoored", "recipe", "recipe_pooler_reset", "pooler_reset", "lambda0", "reg_only",
                          "lambda0.5", "recipe_on_clean", "fp", "fp_gm", "fp_ga", "finemix", "finemix_epur"]
    for key in ("command", "commit", "date", "machine", "recommended", "rows"):
        assert key in result, key
    for rid, r in rows.items():
        assert r["seeds"] == [1, 2] and all(len(r["per_seed"][m]) == 2 for m in ("acc", "aasr", "masr")), rid
        assert r["aasr"] == pytest.approx(sum(r["per_seed"]["aasr"]) / 2), rid
    # The paired comparison is the per-seed difference of the two rows' AASR.
    pair = result["paired"]["recipe-vs-lambda0"]
    assert pair["aasr_diff"] == pytest.approx([a - b for a, b in zip(rows["recipe"]["per_seed"]["aasr"], rows["lambda0"]["per_seed"]["aasr"])])
    assert "| RECIPE λ=1 (pooler kept) **(recommended)** | `recipe` |" in proc.stdout
    # The ablations really ran with their settings, from the fitted-head PTM.
    assert "lam: 0.0" in (out / "configs" / "purify-lam0.yaml").read_text()
    assert "pt_weight: 0.0" in (out / "configs" / "purify-regonly.yaml").read_text()
    assert str(out / "fit-head" / "model") in (out / "configs" / "attack-por.yaml").read_text()
    assert set(rows["recipe"]["config"]["norm_ratio"]) and rows["recipe_pooler_reset"]["config"]["pooler"] == "reset"
    # The baselines ran with their settings: pruning counts, Fine-mixing per seed on the victims.
    assert rows["fp"]["config"]["layers_worth"] == 1.0 and rows["fp_ga"]["config"]["pruned"] > rows["fp_gm"]["config"]["pruned"]
    assert rows["finemix"]["config"]["epur_topn"] == 0 and rows["finemix_epur"]["config"]["epur_topn"] == 200
    assert (out / "eval-backdoored-classifiers" / "seed2" / "model" / "config.json").is_file()
    # Table 10's analogue: poison-only neurons before and after RECIPE.
    assert set(result["neurons"]["models"]) == {"backdoored", "recipe"} and "poison-only neurons" in proc.stdout
    # A stage interrupted after its last checkpoint (summary and export missing) continues from
    # its checkpoints instead of starting over, and exports the same weights.
    attack = out / "attack-por"
    weights = (attack / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(attack / "model")
    (attack / "summary.json").unlink()
    resumed = run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out, "--rows", "backdoored"])
    assert "attack-por: resuming the interrupted stage" in resumed.stdout
    assert (attack / "model" / "model.safetensors").read_bytes() == weights and (attack / "summary.json").is_file()
    # The probe looks inside the kept victims: its per-trigger ASR is the one `evaluate` measures
    # for the same classifier on the same held-out file, scored as it is.
    probed = run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out, "--probe"])
    probe = json.loads((out / "probe.json").read_text())
    assert list(probe["models"]) == ["backdoored PTM", "victim seed 1", "victim seed 2"] and "| cf |" in probed.stdout
    from recipe_dist.evaluation.finetune import evaluate
    from recipe_dist.evaluation.finetune import EvalConfig
    from recipe_dist.lab.stages import scoring

    cfg = scoring(EvalConfig(), out / "eval-backdoored-classifiers" / "seed2" / "model", out / "task" / "train.tsv", out / "heldout" / "test.tsv")
    cfg.output_dir, cfg.seeds, cfg.finetune.epochs, cfg.finetune.max_length = str(tmp_path / "score-victim"), "2", 0, 32
    scored = evaluate(cfg)
    for t, asr in scored["per_seed"][0]["asr_per_trigger"].items():
        assert probe["models"]["victim seed 2"]["triggers"][t]["asr"] == pytest.approx(asr), t
    assert all(0 <= r["sign_agreement"] <= 100 for m in probe["models"].values() for r in m["triggers"].values())
    # The part-5 search: candidates scored on the held-out end of the task's TRAINING file (never
    # the test set), each with its own setting, and the selection rule applied to their numbers.
    run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out, "--search", "--candidates", "ffn-lr1e-4-e1,ffn-lr1e-4-e1-lambda0"])
    search = json.loads((out / "search.json").read_text())
    train_rows = (out / "task" / "train.tsv").read_text().splitlines()
    held_rows = (out / "heldout" / "test.tsv").read_text().splitlines()
    assert held_rows[1:] == train_rows[-32:] and not set(held_rows[1:]) & set(train_rows[1:97])
    cands = search["candidates"]
    assert list(cands) == ["ffn-lr1e-4-e1", "ffn-lr1e-4-e1-lambda0"]
    assert any(".output.dense.weight" in k and "attention" not in k for k in cands["ffn-lr1e-4-e1"]["config"]["norm_ratio"])
    assert cands["ffn-lr1e-4-e1"]["config"]["optim"]["lr"] == 1e-4 and cands["ffn-lr1e-4-e1-lambda0"]["config"]["regularizer"]["lam"] == 0.0
    eligible = {k: c["aasr"] for k, c in cands.items() if c["acc"] >= search["backdoored"]["acc"] - 2.0}
    assert search["selected"] == (min(eligible, key=eligible.get) if eligible else None)
    # More held-out seeds for some candidates: a file of their own, the search of record untouched.
    before = (out / "search.json").read_text()
    run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out, "--search", "--seeds", "1,2", "--candidates", "ffn-lr1e-4-e1"])
    confirm = json.loads((out / "search-s1-2.json").read_text())
    assert (out / "search.json").read_text() == before and list(confirm["candidates"]) == ["ffn-lr1e-4-e1"]
    assert confirm["seeds"] == [1, 2] and len(confirm["candidates"]["ffn-lr1e-4-e1"]["per_seed"]["aasr"]) == 2
    if search["selected"]:
        picked = run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out, "--rows",
                          "recipe_selected,lambda0_selected,recipe_on_clean_selected"])
        # The searched models themselves (the selection and its lambda=0 twin, both candidates
        # here), not second purifications; only the clean PTM's purification is new.
        sel = search["selected"]
        assert [ln.split("] ")[-1] for ln in picked.stdout.splitlines() if "recipe-dist purify" in ln] == [
            f"purify-clean-{sel}: recipe-dist purify"]
        assert str(out / "fit-head" / "model") in (out / "configs" / f"purify-clean-{sel}.yaml").read_text()
        rows = json.loads((out / "bench.json").read_text())["rows"]
        assert rows["recipe_selected"]["config"]["candidate"] == search["selected"]
        twin = rows["lambda0_selected"]["config"]
        assert twin["regularizer"]["lam"] == 0.0 and twin["candidate"] == "ffn-lr1e-4-e1-lambda0"
        assert twin["optim"] == rows["recipe_selected"]["config"]["optim"]
        assert "recipe-vs-lambda0_selected" in json.loads((out / "bench.json").read_text())["paired"]
        assert rows["recipe_on_clean_selected"]["config"]["optim"] == rows["recipe_selected"]["config"]["optim"]
    # A second run reuses every finished stage.
    again = run_cli(["bench", "defense", "--preset", "smoke", "--output_dir", out])
    assert "recipe-dist purify" not in again.stdout and "recipe-dist prune" not in again.stdout and "recipe-dist finemix" not in again.stdout
    assert "reusing" in again.stdout


def test_small_rows_take_the_small_setting_with_their_own_lambda():
    from recipe_dist.lab.defense import SEARCH, candidate, purification
    from recipe_dist.lab.defense.recipes import minilm_por, smoke

    r = minilm_por()
    setting = SEARCH[r.small_setting]
    swept = purification(r, 0.5, small=True)
    assert swept.optim.lr == setting["optim.lr"] and swept.train.epochs == setting["train.epochs"]
    assert (swept.regularizer.lam, swept.regularizer.pt_weight) == (0.5, 1.0)
    assert purification(r, 1.0, pt_weight=0.0, small=True).regularizer.pt_weight == 0.0
    # The table's own rows keep the reference budget.
    ref = purification(r, 1.0)
    assert ref.optim.lr == 2e-5 and ref.train.epochs == 4.0 and ref.train.max_steps == 0
    # The small setting at lambda 1 is the search candidate itself: recipe_selected's model.
    assert purification(r, 1.0, small=True) == candidate(r, r.small_setting)
    # A preset without a small setting runs its small rows at its own RECIPE setting.
    tiny = smoke()
    assert purification(tiny, 0.5, small=True) == purification(tiny, 0.5)


def test_recipes_are_derived_by_assignment_and_set_through_the_product_rules():
    from recipe_dist.config import ConfigError
    from recipe_dist.lab.defense.recipes import minilm_badpre, minilm_por

    por, badpre = minilm_por(), minilm_badpre()
    assert badpre.attack.attack.name == "badpre" and badpre.purify.train.epochs == 8.0 and badpre.eval == por.eval
    changed = por.set(["purify.optim.lr=2e-4", "eval.seeds=1,2", "recommended=recipe_selected"])
    assert changed.purify.optim.lr == 2e-4 and changed.seeds == [1, 2] and changed.recommended == "recipe_selected"
    assert por.purify.optim.lr == 2e-5  # the preset itself is untouched
    with pytest.raises(ConfigError, match="purify.optim.lrr"):
        por.set(["purify.optim.lrr=1"])
    with pytest.raises(ConfigError, match="purify.optim.lr"):
        por.set(["purify.optim.lr=fast"])


def test_a_cached_score_of_another_model_is_refused(tmp_path):
    """Stages are reused by name: a row whose model changed (recipe_selected after a new search)
    must not inherit the old model's score."""
    from recipe_dist.config import ConfigError
    from recipe_dist.lab.defense import PRESETS, DefenseBench

    bench = DefenseBench("smoke", PRESETS["smoke"](), tmp_path, tmp_path, tmp_path)
    (tmp_path / "eval-recipe_selected").mkdir()
    old = tmp_path / "search-in-lr1e-4-e1" / "model"
    (tmp_path / "eval-recipe_selected" / "eval.json").write_text(json.dumps({"model": str(old), "acc": 86.0}))
    assert bench.evaluate("recipe_selected", old, tmp_path, tmp_path)["acc"] == 86.0  # the same model: reused
    with pytest.raises(ConfigError, match=r"eval-recipe_selected/eval.json: scores .*search-in-lr1e-4-e1/model, not .*in-lr2e-4-e1"):
        bench.evaluate("recipe_selected", tmp_path / "search-in-lr2e-4-e1" / "model", tmp_path, tmp_path)


@pytest.mark.parametrize("config, candidate_id", [("bert-recommended.yaml", "ffn-all-lr1e-4-e1"), ("bert-fast.yaml", "in-lr1e-4-e1")])
def test_shipped_configs_are_the_search_candidates_they_name(config, candidate_id):
    """The configs a user runs are the settings the benchmark measured, field for field."""
    from pathlib import Path

    from recipe_dist.config import load_config
    from recipe_dist.lab.defense import candidate
    from recipe_dist.lab.defense.recipes import minilm_por
    from recipe_dist.models import get_family

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / config))
    want = candidate(minilm_por(), candidate_id)
    default = list(get_family("bert").default_regularized)
    assert (cfg.model.regularized or default) == (want.model.regularized or default)
    assert cfg.model.trainable == want.model.trainable and cfg.optim.lr == want.optim.lr
    assert cfg.train.epochs == want.train.epochs and cfg.train.max_steps == want.train.max_steps
    assert cfg.train.global_batch_size == want.train.global_batch_size
    assert (cfg.regularizer.lam, cfg.regularizer.pt_weight) == (want.regularizer.lam, want.regularizer.pt_weight)
