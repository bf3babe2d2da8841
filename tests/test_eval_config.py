"""`EvalConfig` declares its domains as `RunConfig` does: a `check=` rule on every field, checked
by `check_fields`, and only the rules that span fields in `validate()`."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from conftest import REPO, run_cli
from recipe_dist.config import ADAMW_LR, ConfigError, RunConfig, check_fields, ge, gt, load_config
from recipe_dist.evaluation.finetune import EvalConfig

SST2 = REPO / "configs" / "eval" / "sst2.yaml"
REQUIRED = ["--model.path", "m", "--task.train_file", "train.tsv", "--task.test_file", "test.tsv"]


def _leaves(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name], f


def test_every_eval_field_declares_its_domain():
    # A bool's domain is its annotation (`set_key` takes true/false only); every other field has a rule.
    missing = [key for key, typ, f in _leaves(EvalConfig) if typ is not bool and f.metadata.get("check") is None]
    assert missing == []


def test_the_finemix_fields_have_domains_too():
    fm = {key: f.metadata.get("check") for key, _, f in _leaves(RunConfig) if key.startswith("finemix.")}
    for key in ("finetune.lr", "finetune.batch_size", "finetune.max_length", "finetune.epochs", "finetune.max_train_samples",
                "finetune.seed", "rho", "epur_topn", "epur_min_freq"):
        assert fm[f"finemix.{key}"] is not None, key
    assert fm["finemix.finetune.lr"] is ADAMW_LR


def test_bounds_refuse_nan_and_inf():
    for rule in (gt(0), ge(0), ADAMW_LR):
        assert not rule(float("nan")) and not rule(float("inf"))
    assert gt(0)(1e-5) and ge(0)(0) and gt(1)(2) and not gt(0)(0) and not ge(0)(-1e-9)
    assert ADAMW_LR(2e-5) and ADAMW_LR(1.0) and not ADAMW_LR(1e30) and not ADAMW_LR(0.0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("--finetune.lr=1e30", "finetune.lr"),
        ("--finetune.lr=nan", "finetune.lr"),
        ("--finetune.lr=inf", "finetune.lr"),
        ("--finetune.lr=0", "finetune.lr"),
        ("--finetune.weight_decay=-0.1", "finetune.weight_decay"),
        ("--finetune.weight_decay=nan", "finetune.weight_decay"),
        ("--finetune.grad_clip=-1", "finetune.grad_clip"),
        ("--finetune.epochs=-1", "finetune.epochs"),
        ("--finetune.batch_size=0", "finetune.batch_size"),
        ("--finetune.max_length=1", "finetune.max_length"),
        ("--finetune.max_train_samples=-5", "finetune.max_train_samples"),
        ("--finetune.seed=-1", "finetune.seed"),
        ("--task.num_labels=1", "task.num_labels"),
        ("--task.num_labels=-2", "task.num_labels"),
        ("--task.text_column=", "task.text_column"),
        ("--task.train_file=", "task.train_file"),
        ("--model.path=", "model.path"),
        ("--model.family= ", "model.family"),
        ("--output_dir=", "output_dir"),
        ("--triggers.words=", "triggers.words"),
        ("--triggers.words=cf,two words", "triggers.words"),
        ("--triggers.times=0", "triggers.times"),
        ("--triggers.patch_size=0", "triggers.patch_size"),
        ("--triggers.seed=-3", "triggers.seed"),
        ("--seeds=1,x", "seeds"),
        ("--seeds=1,1", "seeds"),
        ("--seeds=1,-2", "seeds"),
    ],
)
def test_a_value_outside_its_domain_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(str(SST2), [*REQUIRED, override], cls=EvalConfig)
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg, msg


def test_the_defaults_and_the_shipped_configs_pass():
    for path in sorted((REPO / "configs" / "eval").glob("*.yaml")):
        load_config(str(path), REQUIRED, cls=EvalConfig)
    cfg = load_config(None, [*REQUIRED, "--seeds=1,2,3", "--finetune.lr=1", "--finetune.epochs=0", "--task.num_labels=2"], cls=EvalConfig)
    assert cfg.seed_list() == [1, 2, 3] and cfg.finetune.lr == 1.0


def test_validate_checks_fields_first_then_the_cross_field_rule(tmp_path):
    # Code that builds the config by assignment (the lab's stages) goes through the same rules.
    cfg = load_config(str(SST2), REQUIRED, cls=EvalConfig)
    cfg.finetune.lr = float("nan")
    with pytest.raises(ConfigError, match=r"^finetune\.lr: nan must be finite$"):
        cfg.validate()
    cfg.finetune.lr = 1e30
    with pytest.raises(ConfigError, match=r"^finetune\.lr: 1e\+30 must be in \(0, 1\]"):
        cfg.validate()
    cfg.finetune.lr = 2e-5
    cfg.validate()
    # Across fields: evaluate writes into output_dir, and the model directory is only read.
    cfg.model.path = str(tmp_path / "model")
    cfg.output_dir = str(tmp_path / "." / "model")
    with pytest.raises(ConfigError, match=r"^output_dir: .* is model\.path"):
        cfg.validate()


def test_run_config_bounds_refuse_nan_and_inf_too():
    for override, key in (("--optim.lr=nan", "optim.lr"), ("--optim.lr=inf", "optim.lr"), ("--train.epochs=inf", "train.epochs"),
                          ("--finemix.finetune.lr=1e30", "finemix.finetune.lr"), ("--finemix.finetune.lr=nan", "finemix.finetune.lr"),
                          ("--finemix.finetune.batch_size=0", "finemix.finetune.batch_size"), ("--finemix.finetune.seed=-1", "finemix.finetune.seed")):
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', r'[.]')}: "):
            load_config(None, [override])
    # The trainer's optim.lr stays uncapped: its loop stops a diverging run itself (tests/test_safety.py).
    assert load_config(None, ["--optim.lr=1e30"]).optim.lr == 1e30
    cfg = RunConfig()
    cfg.optim.eps = float("inf")
    with pytest.raises(ConfigError, match=r"^optim\.eps: inf must be finite$"):
        check_fields(cfg)


def test_evaluate_cli_refuses_a_bad_lr_with_one_line(tmp_path):
    for value in ("1e30", "nan"):
        proc = run_cli(["evaluate", "--config", SST2, "--model.path", tmp_path / "m", "--output_dir", tmp_path / "out",
                        "--task.train_file", "train.tsv", "--task.test_file", "test.tsv", f"--finetune.lr={value}"], check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("recipe-dist: error: finetune.lr: "), proc.stderr
    assert not (tmp_path / "out").exists()
