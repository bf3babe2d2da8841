"""The lab's one stage runner: every experiment (demo, bench defense, vision, decoder) builds its
stages as the product's own `RunConfig` / `EvalConfig` and hands them here.

A stage is a product command (`purify`, `attack`, `fit-head`, `prune`, `finemix`) run as a user
runs it, `python -m recipe_dist CMD --config OUTPUT/configs/NAME.yaml`, into OUTPUT/NAME. Its
name is given once, here; the runner then
- reuses it when it finished earlier (summary.json and the exported model exist),
- resumes it from its newest complete checkpoint when it was interrupted (the trainer refuses,
  naming the key, if the setting changed since), and
- otherwise clears what a failed start left and runs it.
An evaluation is reused the same way, and refused when the cached score is of another model.

Experiments derive a stage's config from `base_run` (and an evaluation from `EvalConfig`) by
assignment, fill in models and files with `on_model` / `scoring`, and hold them
in a recipe (a dataclass of the product's configs); the command line changes any field through
the product's `config.set_key` (`--set purify.optim.lr=2e-4`, see `set_keys`), so the lab has no
configuration language of its own.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, check_fields, dump_yaml, set_key, to_dict
from ..rundir import check_resume_config
from ..errors import RecipeError
from ..evaluation.finetune import EvalConfig


def base_run(model: Path | str = "", *, family: str = "bert", train_urls: str = "", aux_samples: int = 2000,
             max_length: int = 64) -> RunConfig:
    """A single-process stage on `train_urls` (empty: the SYNTHETIC corpus of `aux_samples`
    sentences); an empty `model` builds the family's tiny model from model.tiny."""
    cfg = RunConfig()
    cfg.model.family, cfg.model.path = family, str(model)
    cfg.data.train_urls, cfg.data.synthetic_samples, cfg.data.max_length = train_urls, aux_samples, max_length
    cfg.data.num_workers = 0
    cfg.optim.name, cfg.optim.schedule, cfg.optim.weight_decay = "adamw", "linear", 0.0
    cfg.train.grad_clip, cfg.train.zero_stage, cfg.train.log_every, cfg.train.seed = 1.0, 0, 5, 0
    cfg.checkpoint.every_steps, cfg.checkpoint.keep = 100, 2
    return cfg


def with_batch(cfg: RunConfig, batch: int) -> RunConfig:
    """`cfg` at one process's batch `batch` (micro = global: no accumulation)."""
    cfg.train.micro_batch_size = cfg.train.global_batch_size = batch
    return cfg


def on_model(cfg: RunConfig, model: Path | str | None, train_urls: str | None = None) -> RunConfig:
    """A copy of stage config `cfg` starting from `model` (None: the family's tiny model, built
    from model.tiny) and, when given, reading `train_urls`."""
    cfg = copy.deepcopy(cfg)
    cfg.model.path = str(model or "")
    if train_urls is not None:
        cfg.data.train_urls = train_urls
    return cfg


def scoring(cfg: EvalConfig, model: Path | str, train: Path | str, test: Path | str) -> EvalConfig:
    """A copy of evaluation `cfg` for `model`, fine-tuned on `train` (once per seed) and scored on `test`."""
    cfg = copy.deepcopy(cfg)
    cfg.model.path, cfg.task.train_file, cfg.task.test_file = str(model), str(train), str(test)
    return cfg


def finemix_run(cfg: RunConfig, finetune, *, samples: int, seed: int, clean: Path | str, train: Path | str) -> RunConfig:
    """A copy of finemix stage `cfg` mixing against the clean PTM `clean`, then fine-tuning with the
    downstream protocol `finetune` for one epoch on the first `samples` rows of `train`; `seed`
    draws the random mask and that fine-tuning."""
    cfg = copy.deepcopy(cfg)
    m = cfg.finemix
    m.finetune = copy.deepcopy(finetune)
    m.finetune.epochs, m.finetune.max_train_samples, m.finetune.seed = 1, samples, seed
    m.pretrained, m.train_file = str(clean), str(train)
    return cfg


def add_set_option(ap, example: str) -> None:
    """The lab's one override option on a command's parser (see `set_keys`)."""
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"change one field of the preset's recipe through the product's set_key, e.g. {example} (recorded in the results)")


def set_keys(recipe, items: list[str]):
    """A copy of `recipe` (an experiment's dataclass of the product's configs) with KEY=VALUE
    items set through the product's `set_key`: the lab's one override language, type-checked
    against the field as `recipe-dist CMD --section.key=value` is (`--set purify.optim.lr=2e-4`)."""
    out = copy.deepcopy(recipe)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. purify.optim.lr=2e-4")
        set_key(out, key, value)
    # The recipe's own fields keep their rules (a held-out size above 0, ...); each stage config is
    # validated whole when its stage runs, once its model and data are filled in.
    check_fields(out, nested=False)
    return out


class Stages:
    """Runs an experiment's stages under `out` (see the module docstring)."""

    def __init__(self, out: Path, label: str):
        self.out, self.label = Path(out), label
        self.t0 = time.time()

    def say(self, msg: str) -> None:
        print(f"[{self.label} {time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def done(self, name: str, report: str = "summary.json") -> bool:
        run_dir = self.out / name
        return (run_dir / report).is_file() and (run_dir / "model").is_dir()

    def run(self, cmd: str, name: str, cfg: RunConfig, report: str = "summary.json") -> Path:
        """Stage `name`: `recipe-dist CMD` on `cfg` into OUTPUT/NAME; returns its exported model.
        `report` is the file that marks it finished (fit-head writes fit_head.json after its summary)."""
        run_dir = self.out / name
        cfg = copy.deepcopy(cfg)
        cfg.output_dir = str(run_dir)
        if self.done(name, report):
            # A finished stage is reused only for the same setting: the trainer's own resume rule
            # (rundir.check_resume_config) refuses, naming the key, a setting that changes the result.
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
            check_resume_config(saved, to_dict(cfg), run_dir)
            self.say(f"{name}: reusing {run_dir}")
            return run_dir / "model"
        if any((run_dir / "checkpoints").glob("step_*")):
            cfg.resume = "auto"
            self.say(f"{name}: resuming the interrupted stage in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # no checkpoint: nothing of it is worth keeping
        cfg.validate()
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_yaml(cfg))
        self.say(f"{name}: recipe-dist {cmd}")
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)  # each stage is its own single-process job
        proc = subprocess.run([sys.executable, "-m", "recipe_dist", cmd, "--config", str(path)], env=env)
        if proc.returncode != 0:
            raise RecipeError(f"{self.label}: `recipe-dist {cmd} --config {path}` failed with exit code {proc.returncode} (its output is above)")
        summary = json.loads((run_dir / report).read_text())
        self.say(f"{name}: {summary['steps']} steps in {summary.get('wall_time_s', 0):.0f} s" if "steps" in summary else f"{name}: done")
        return run_dir / "model"

    def summary(self, name: str) -> dict:
        return json.loads((self.out / name / "summary.json").read_text())

    def evaluate(self, name: str, cfg: EvalConfig) -> dict:
        """`recipe-dist evaluate` (in-process) into OUTPUT/NAME; a cached eval.json is reused only
        when it scores the same model (a row whose model changed must not pass for the new one)."""
        from ..evaluation.finetune import evaluate

        out = self.out / name
        cached = out / "eval.json"
        cfg = copy.deepcopy(cfg)
        cfg.output_dir = str(out)
        if cached.is_file():
            report = json.loads(cached.read_text())
            if report.get("model") != cfg.model.path:
                raise ConfigError(f"{cached}: scores {report.get('model')}, not {cfg.model.path}; move that directory away to score this model")
            now = to_dict(cfg)
            if "config" in report and report["config"] != now:
                changed = sorted(k for k in set(report["config"]) | set(now) if report["config"].get(k) != now.get(k))
                raise ConfigError(f"{cached}: scored with another evaluation setting ({', '.join(changed)}); "
                                  "move that directory away to score it again")
            self.say(f"{name}: reusing {cached}")
            return report
        cfg.validate()
        seeds = cfg.seeds or str(cfg.finetune.seed)
        self.say(f"{name}: fine-tune, seeds {seeds}" if cfg.finetune.epochs else f"{name}: score as it is")
        report = evaluate(cfg)
        self.say(f"{name}: ACC {report['acc']:.2f}  AASR {report['aasr']:.2f}  MASR {report['masr']:.2f}")
        return report
