"""Every training path runs with dropout active on a model loaded from disk (issue 16).

`from_pretrained` returns models in eval mode; tiny models built from a config start in train
mode, which is why earlier tests never saw the bug. Each test saves a tiny BERT with dropout 0.1
to disk, drives the real CLI, and records through a process-wide forward hook (installed by a
`sitecustomize` on PYTHONPATH) the `training` flag of every `nn.Dropout` call made with autograd
on (a training step) and with autograd off (prediction).
"""

import json
import os
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, run_cli

SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, json, os
    import torch

    _seen = {"train_grad": 0, "eval_grad": 0, "train_nograd": 0, "eval_nograd": 0}

    def _hook(module, args, output):
        if isinstance(module, torch.nn.Dropout):
            key = ("train" if module.training else "eval") + ("_grad" if torch.is_grad_enabled() else "_nograd")
            _seen[key] += 1

    torch.nn.modules.module.register_module_forward_hook(_hook)

    @atexit.register
    def _dump():
        with open(os.path.join(os.environ["DROPOUT_RECORD_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump(_seen, f)
    """
)


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory) -> Path:
    """A tiny BERT with dropout 0.1 saved with save_pretrained: it loads in eval mode."""
    from recipe_dist.config import TinyArchConfig
    from recipe_dist.models.mlm import build_tiny_bert

    arch = TinyArchConfig(hidden_size=32, intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return build_tiny_bert(tmp_path_factory.mktemp("dropout-bert"), arch, seed=0)


def _recorded(tmp_path: Path, args: list) -> dict:
    hook_dir, record = tmp_path / "hook", tmp_path / "record"
    hook_dir.mkdir()
    record.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]), "DROPOUT_RECORD_DIR": str(record)}
    run_cli(args, env=env, timeout=300)
    totals: dict = {}
    for f in record.glob("*.json"):
        for k, v in json.loads(f.read_text()).items():
            totals[k] = totals.get(k, 0) + v
    assert totals, "the hook recorded nothing"
    return totals


TRAIN = ["--data.synthetic_samples=64", "--train.micro_batch_size=8", "--train.global_batch_size=8",
         "--train.max_steps=2", "--data.max_length=32", "--checkpoint.every_steps=2"]


# purify stays in the fast lane; the attacks' runs are end-to-end and run in CI.
@pytest.mark.parametrize("command", ["purify", *(pytest.param(c, marks=pytest.mark.slow) for c in ("por", "neuba", "badpre"))])
def test_training_paths_run_with_dropout_active(tmp_path, dropout_bert, command):
    from recipe_dist.attacks.neuba import TINY_TRIGGERS

    configs = {"purify": REPO / "configs" / "tiny-bert.yaml", "por": REPO / "configs" / "attack" / "por-bert.yaml",
               "neuba": REPO / "configs" / "attack" / "neuba-bert.yaml", "badpre": REPO / "configs" / "attack" / "badpre-bert.yaml"}
    args = ["purify" if command == "purify" else "attack", "--config", configs[command], "--model.path", dropout_bert,
            "--output_dir", tmp_path / "run", *TRAIN]
    if command == "neuba":
        args.append("--attack.triggers=" + ",".join(TINY_TRIGGERS))
    seen = _recorded(tmp_path, args)
    assert seen["train_grad"] > 0, seen
    # POR's frozen reference runs under no_grad in eval mode; nothing with a graph runs in eval mode.
    assert seen["eval_grad"] == 0, seen


def test_evaluate_finetunes_with_dropout_and_predicts_without(tmp_path, dropout_bert):
    rows = ["sentence\tlabel"] + [f"{'good fine' if i % 2 else 'bad poor'} text number {i}\t{i % 2}" for i in range(24)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(rows[:9]) + "\n")
    seen = _recorded(tmp_path, ["evaluate", "--config", REPO / "configs" / "eval" / "sst2.yaml", "--model.path", dropout_bert,
                                "--output_dir", tmp_path / "eval", "--task.train_file", tmp_path / "train.tsv",
                                "--task.test_file", tmp_path / "test.tsv", "--finetune.epochs=1", "--finetune.batch_size=8",
                                "--finetune.max_length=32"])
    assert seen["train_grad"] > 0 and seen["eval_grad"] == 0, seen
    assert seen["eval_nograd"] > 0 and seen["train_nograd"] == 0, seen  # predictions: dropout off
