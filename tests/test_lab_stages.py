"""The lab's stage runner reuses a finished stage or evaluation only for the same setting, and a
recipe's --set keeps the product's type checks and the recipe's own rules."""

import json

import pytest

from recipe_dist.config import ConfigError, RunConfig, dump_yaml, to_dict
from recipe_dist.evaluation.finetune import EvalConfig
from recipe_dist.lab.stages import Stages, set_keys
from recipe_dist.rundir import RunDirError, check_resume_config


def finished(out, name, cfg):
    run = out / name
    (run / "model").mkdir(parents=True)
    cfg.output_dir = str(run)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "summary.json").write_text(json.dumps({"steps": 3}))


def test_a_finished_stage_is_reused_only_for_its_own_setting(tmp_path):
    cfg = RunConfig()
    cfg.optim.lr = 2e-5
    finished(tmp_path, "purify-lam1", cfg)
    stages = Stages(tmp_path, "test")
    assert stages.run("purify", "purify-lam1", cfg) == tmp_path / "purify-lam1" / "model"  # same setting: reused, nothing runs
    changed = RunConfig()
    changed.optim.lr = 2e-4
    with pytest.raises(RunDirError, match=r"optim.lr is 0.0002 but .*purify-lam1 was trained with 2e-05"):
        stages.run("purify", "purify-lam1", changed)


def test_a_cached_evaluation_is_reused_only_for_its_own_setting(tmp_path):
    cfg = EvalConfig()
    cfg.model.path, cfg.seeds = "/m", "1,2"
    out = tmp_path / "eval-x"
    out.mkdir()
    cfg.output_dir = str(out)
    (out / "eval.json").write_text(json.dumps({"model": "/m", "acc": 80.0, "config": to_dict(cfg)}))
    stages = Stages(tmp_path, "test")
    assert stages.evaluate("eval-x", cfg)["acc"] == 80.0
    cfg.seeds = "1,2,3"
    with pytest.raises(ConfigError, match=r"eval-x/eval.json: scored with another evaluation setting \(seeds\)"):
        stages.evaluate("eval-x", cfg)


def test_a_key_added_later_is_compared_with_what_its_absence_meant(tmp_path):
    old = to_dict(RunConfig())
    del old["attack"]["por_l1_rows"]  # a run recorded before the key existed: L1 on clean rows
    now = RunConfig()
    now.attack.por_l1_rows = "all"
    with pytest.raises(RunDirError, match="attack.por_l1_rows is 'all' but .* was trained before it existed"):
        check_resume_config(old, to_dict(now), tmp_path)
    now.attack.por_l1_rows = "clean"
    check_resume_config(old, to_dict(now), tmp_path)


def test_set_keys_type_checks_and_keeps_the_recipes_rules():
    from recipe_dist.lab.study import smoke

    r = set_keys(smoke(), ["purify_seeds=4,5", "reference.optim.lr=3e-4"])
    assert r.purify_seeds == [4, 5] and r.reference.optim.lr == 3e-4
    with pytest.raises(ConfigError, match="purify_seeds"):
        set_keys(smoke(), ["purify_seeds="])
    with pytest.raises(ConfigError, match="holdout: 0 must be > 0"):
        set_keys(smoke(), ["holdout=0"])
    with pytest.raises(ConfigError, match="reference.optim.lr"):
        set_keys(smoke(), ["reference.optim.lr=fast"])
