"""Run config: YAML files, typed `--section.key` overrides, errors that name the key, DeepSpeed JSON."""

from __future__ import annotations

from pathlib import Path

import pathlib

import pytest
import yaml

from recipe_dist import cli
from recipe_dist.config import ConfigError, RunConfig, apply_dict, deepspeed_config, dump_yaml, help_text, load_config
from recipe_dist.evaluation.finetune import EvalConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-bert.yaml"
BASE = REPO / "configs" / "bert-base-uncased.yaml"


# ------------------------------------------------------------------ loading the shipped configs


def test_load_tiny_bert_yaml():
    cfg = load_config(str(TINY))
    assert isinstance(cfg, RunConfig)
    assert cfg.output_dir == "runs/tiny-bert"
    assert cfg.model.family == "bert"
    assert cfg.model.path == ""
    assert cfg.model.tiny.hidden_size == 64
    assert cfg.model.tiny.intermediate_size == 128
    assert cfg.data.max_length == 32
    assert cfg.data.shuffle_buffer == 256
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert type(cfg.optim.lr) is float
    assert cfg.train.micro_batch_size == 16
    assert cfg.train.global_batch_size == 32
    # epochs is declared float; YAML's `1` must be coerced
    assert type(cfg.train.epochs) is float and cfg.train.epochs == 1.0
    assert cfg.checkpoint.every_steps == 20
    # keys the file does not set keep their defaults
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.train.seed == 42


def test_load_bert_base_yaml():
    cfg = load_config(str(BASE))
    assert cfg.output_dir == "runs/bert-base-uncased"
    assert cfg.model.path == "/models/bert-base-uncased"
    assert cfg.model.allow_pickle is False
    assert cfg.model.trust_remote_code is False
    assert cfg.model.regularized == []
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.optim.eps == pytest.approx(1e-8)
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.train.zero_stage == 2
    assert cfg.train.epochs == 4.0
    assert cfg.data.num_workers == 2
    assert cfg.checkpoint.keep == 3


def test_missing_config_file_is_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(missing))


# ------------------------------------------------------------------ overrides


def test_override_int_equals_form():
    cfg = load_config(str(TINY), ["--train.zero_stage=3"])
    assert cfg.train.zero_stage == 3
    assert type(cfg.train.zero_stage) is int


def test_override_float_two_token_form():
    cfg = load_config(str(TINY), ["--optim.lr", "0.5"])
    assert cfg.optim.lr == 0.5
    assert type(cfg.optim.lr) is float


def test_override_float_from_integer_string():
    cfg = load_config(str(TINY), ["--train.epochs=3"])
    assert cfg.train.epochs == 3.0 and type(cfg.train.epochs) is float


def test_overrides_mixed_forms_in_order():
    cfg = load_config(str(TINY), ["--train.seed", "7", "--optim.lr=0.25", "--output_dir", "/tmp/x"])
    assert cfg.train.seed == 7
    assert cfg.optim.lr == 0.25
    assert cfg.output_dir == "/tmp/x"


@pytest.mark.parametrize("raw,expected", [("true", True), ("false", False), ("True", True), ("FALSE", False)])
def test_override_bool_strings(raw, expected):
    cfg = load_config(str(TINY), [f"--model.allow_pickle={raw}"])
    assert cfg.model.allow_pickle is expected


def test_override_bool_rejects_garbage():
    with pytest.raises(ConfigError, match=r"model\.allow_pickle"):
        load_config(str(TINY), ["--model.allow_pickle=maybe"])


def test_override_list():
    cfg = load_config(str(TINY), ["--model.regularized=a,b"])
    assert cfg.model.regularized == ["a", "b"]


def test_override_list_of_floats_keeps_element_type():
    cfg = load_config(str(TINY), ["--optim.betas=0.8,0.95"])
    assert cfg.optim.betas == [0.8, 0.95]
    assert all(type(b) is float for b in cfg.optim.betas)


def test_override_beats_yaml():
    assert load_config(str(TINY)).train.micro_batch_size == 16
    cfg = load_config(str(TINY), ["--train.micro_batch_size=8"])
    assert cfg.train.micro_batch_size == 8


def test_type_error_names_key():
    with pytest.raises(ConfigError) as ei:
        load_config(str(TINY), ["--train.micro_batch_size=abc"])
    assert "train.micro_batch_size" in str(ei.value)
    assert "abc" in str(ei.value)


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as ei:
        load_config(str(TINY), ["--train.micro_batch=4"])
    msg = str(ei.value)
    assert "train.micro_batch'" in msg or "'train.micro_batch" in msg
    assert "train.micro_batch_size" in msg


def test_unknown_section_is_config_error():
    with pytest.raises(ConfigError, match=r"trian\.seed"):
        load_config(str(TINY), ["--trian.seed=1"])


def test_override_missing_value():
    with pytest.raises(ConfigError, match=r"train\.seed"):
        load_config(str(TINY), ["--train.seed"])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(bad))
    msg = str(ei.value)
    assert str(bad) in msg
    assert "train.micro_batch" in msg
    assert "train.micro_batch_size" in msg


@pytest.mark.parametrize("text, line, key, first", [
    ("model:\n  family: bert\nregularizer:\n  lam: 1.0\n  lam: 0.0\n", 5, "lam", 4),  # a key twice in a section
    ("train:\n  epochs: 1\nregularizer:\n  lam: 1.0\ntrain:\n  seed: 3\n", 5, "train", 1),  # a section twice
])
def test_a_duplicated_yaml_key_names_file_line_and_key(tmp_path, text, line, key, first):
    """PyYAML keeps the last of two equal keys silently; a config file that says a thing twice is refused."""
    bad = tmp_path / "dup.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{bad}:{line}: duplicated key '{key}' \(first on line {first}\)"):
        load_config(str(bad))
    # every shipped config and the same keys once each still load
    for shipped in sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(str(shipped))


def test_type_error_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(bad))
    assert str(bad) in str(ei.value)
    assert "optim.lr" in str(ei.value)


def test_validation_names_key():
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(str(TINY), ["--train.zero_stage=4"])


# ------------------------------------------------------------------ Literal choices and typed lists


@pytest.mark.parametrize("override,choices", [
    ("--train.precision=fp8", "fp32, bf16, fp16"),
    ("--train.zero_stage=abc", "0, 1, 2, 3"),
    ("--model.trainable=some", "family, all, regularized"),
    ("--preempt.requeue=always", "auto, never"),
])
def test_bad_choice_is_one_line_naming_key_and_choices(override, choices):
    with pytest.raises(ConfigError) as ei:
        load_config(str(TINY), [override])
    msg = str(ei.value)
    assert msg.startswith(override[2:].split("=")[0] + ":") and choices in msg and "\n" not in msg


def test_choice_set_in_code_is_checked_by_validate():
    cfg = RunConfig()
    cfg.train.zero_stage = True  # == 1, but not a stage
    with pytest.raises(ConfigError, match=r"train\.zero_stage: True must be one of 0, 1, 2, 3"):
        cfg.validate()


def test_yaml_lists_take_their_element_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("attack:\n  loss_weights: [1, 100, 100]\nmodel:\n  regularized: ['intermediate\\.dense']\n")
    cfg = load_config(str(f))
    assert cfg.attack.loss_weights == [1.0, 100.0, 100.0] and all(type(w) is float for w in cfg.attack.loss_weights)
    assert cfg.model.regularized == ["intermediate\\.dense"]
    f.write_text("model:\n  regularized: [null]\n")  # an empty pattern would match every weight
    with pytest.raises(ConfigError, match=r"model\.regularized: expected list\[str\]"):
        load_config(str(f))


@pytest.mark.parametrize("cls", [RunConfig, EvalConfig])
def test_every_field_round_trips_through_yaml(cls):
    # Every annotation is one the loader can coerce (a bare `list` would fail here), and a saved
    # config.yaml loads back to the same config. No validate: EvalConfig requires model.path.
    cfg = cls()
    again = cls()
    apply_dict(again, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_help_lists_choices_and_list_elements():
    text = help_text()
    assert "--train.zero_stage 0|1|2|3 (default 0):" in text
    assert "--train.precision fp32|bf16|fp16 (default 'fp32'):" in text
    assert "--optim.betas float,... (default [0.9, 0.999]):" in text


# ------------------------------------------------------------------ DeepSpeed config


def _cfg(**train):
    cfg = RunConfig()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_deepspeed_config_batch_arithmetic():
    cfg = _cfg(micro_batch_size=4, global_batch_size=64, grad_clip=0.5, zero_stage=2)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 8  # 64 / (4 * 2)
    assert ds["train_batch_size"] == (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    )
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2


def test_deepspeed_config_world_size_changes_accumulation():
    cfg = _cfg(micro_batch_size=4, global_batch_size=32)
    assert deepspeed_config(cfg, 1)["gradient_accumulation_steps"] == 8
    assert deepspeed_config(cfg, 4)["gradient_accumulation_steps"] == 2
    assert deepspeed_config(cfg, 8)["gradient_accumulation_steps"] == 1


def test_deepspeed_config_zero3_and_optimizer():
    cfg = load_config(str(TINY), ["--train.zero_stage=3", "--optim.lr=0.5"])
    ds = deepspeed_config(cfg, 1)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 0.5
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["gradient_accumulation_steps"] == 2  # tiny: 32 / (16 * 1)


def test_deepspeed_config_sgd_and_precision():
    cfg = load_config(str(TINY), ["--optim.name=sgd", "--optim.momentum=0.9", "--train.precision=bf16"])
    ds = deepspeed_config(cfg, 1)
    assert ds["optimizer"]["type"] == "SGD"
    assert ds["optimizer"]["params"]["momentum"] == 0.9
    assert ds["bf16"]["enabled"] is True
    assert ds["fp16"]["enabled"] is False


def test_deepspeed_config_indivisible_global_batch():
    cfg = _cfg(micro_batch_size=4, global_batch_size=30)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        deepspeed_config(cfg, world_size=2)
    # divisible by micro alone but not by micro * world
    cfg = _cfg(micro_batch_size=4, global_batch_size=12)
    deepspeed_config(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        deepspeed_config(cfg, world_size=2)


# ------------------------------------------------------------------ CLI


def test_cli_purify_unknown_key_exits_2_with_one_line(capsys):
    rc = cli.main(["purify", "--config", str(TINY), "--train.bogus=1"])
    assert rc == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("recipe-dist: error:")
    assert "train.bogus" in lines[0]
    assert "Traceback" not in captured.err


def test_cli_unknown_command_exits_2(capsys):
    assert cli.main(["purfy"]) == 2
    assert "purfy" in capsys.readouterr().err


def test_the_micro_batch_is_lowered_to_fit_the_world_and_an_unsplittable_batch_names_the_overrides():
    from recipe_dist.config import ConfigError, RunConfig, deepspeed_config, fit_batch_to_world

    cfg = RunConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 32, 32
    assert fit_batch_to_world(cfg, 2) == "train.micro_batch_size 32 -> 16: global batch 32 = 16 x 2 rank(s) x 1 accumulation step(s)"
    assert deepspeed_config(cfg, 2)["gradient_accumulation_steps"] == 1 and fit_batch_to_world(cfg, 2) == ""
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 48, 10
    assert fit_batch_to_world(cfg, 4) == "train.micro_batch_size 10 -> 6: global batch 48 = 6 x 4 rank(s) x 2 accumulation step(s)"
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 32, 8
    with pytest.raises(ConfigError, match=r"cannot be split over 3 ranks; pass --train.global_batch_size=30 or --train.global_batch_size=33"):
        fit_batch_to_world(cfg, 3)
