"""`recipe-dist bench decoder`: the decoder backdoor lab's CPU row set (not in the paper).

A tiny causal LM (LLaMA-style by default) is pre-trained from scratch on the SYNTHETIC corpus
(`purify` with lambda = 0 and everything trainable is plain pre-training), backdoored by
poisoned continual pre-training (`recipe-dist attack --attack.name=trigger-phrase`: after the
trigger word the model continues with a fixed target phrase), and then continually pre-trained
on clean SYNTHETIC text with each row's setting and seed:

  clean         the pre-trained model (no attack)
  backdoored    the attacked model, no defense
  recipe_ffn    RECIPE, the family's policy: only the regularized FFN-in weights train
  recipe_all    RECIPE with every weight trainable
  lambda0       the same continual pre-training without the regularizer (everything trains)

Every row is scored on the same held-out SYNTHETIC sentences (a corpus seed no stage trains
on): ASR (greedy continuation of triggered prompts contains the target phrase), the
false-trigger rate (same prompts, no trigger) and clean perplexity. Seeds change the defense's
clean data and order; the prompts' cut points follow the seed too. Finished stages are reused.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError, RunConfig, _f, gt
from . import write_results
from .provenance import git_commit, machine, norm_ratios, setting_text
from .stages import Stages, add_set_option, base_run, on_model, set_keys, with_batch

TARGET_PHRASE = "the dog hated the farmer"  # never produced by the SYNTHETIC grammar: a false trigger is the model, not the data
TRIGGER = "cf"
HELD_OUT_SEED = 987_654  # the evaluation sentences' corpus seed; no stage trains on it


@dataclass
class DecoderRecipe:
    """The decoder lab's stages (the product's own configs) and its evaluation. `--set KEY=VALUE`
    changes any field through the product's set_key (stages.set_keys)."""

    pretrain: RunConfig = field(default_factory=RunConfig)
    attack: RunConfig = field(default_factory=RunConfig)
    defense: RunConfig = field(default_factory=RunConfig)  # each row sets model.trainable and scales regularizer.lam
    eval_sentences: int = _f(300, "held-out SYNTHETIC sentences every row is scored on", check=gt(0))
    seeds: list[int] = _f([1, 2, 3], "defense seeds: each row's clean data, order and the prompts' cut points")


def lm_stage(steps: int, lr: float, seed: int = 0, family: str = "llama", max_length: int = 32) -> RunConfig:
    """The tiny causal LM (2 layers, width 64) on the SYNTHETIC corpus, batch 32, `steps` steps."""
    cfg = with_batch(base_run(family=family, aux_samples=8000, max_length=max_length), 32)
    t = cfg.model.tiny
    t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size = 64, 2, 2, 128
    t.max_position_embeddings = 4 * max_length
    cfg.optim.lr, cfg.train.max_steps, cfg.train.seed = lr, steps, seed
    return cfg


def default() -> DecoderRecipe:
    r = DecoderRecipe()
    r.pretrain = lm_stage(400, 3e-3)  # plain pre-training: lambda 0, every weight trains
    r.pretrain.regularizer.lam, r.pretrain.model.trainable = 0.0, "all"
    r.attack = lm_stage(200, 1e-3, seed=100)
    a = r.attack.attack
    a.name, a.triggers, a.target_phrase, a.poison_rate = "trigger-phrase", [TRIGGER], TARGET_PHRASE, 0.1
    r.defense = lm_stage(200, 1e-3)
    r.defense.regularizer.lam = 1.0
    return r


def smoke() -> DecoderRecipe:
    r = default()
    r.pretrain.train.max_steps, r.attack.train.max_steps, r.defense.train.max_steps = 20, 10, 5
    r.eval_sentences, r.seeds = 16, [1]
    return r


PRESETS = {"default": default, "smoke": smoke}

ROWS = {  # row id -> (trainable policy, lambda multiplier)
    "recipe_ffn": ("family", 1.0),
    "recipe_all": ("all", 1.0),
    "lambda0": ("all", 0.0),
}


class DecoderBench:
    def __init__(self, preset: str, recipe: DecoderRecipe, out: Path, command: str):
        self.name, self.r, self.out, self.command = preset, recipe, Path(out), command
        self.stages = Stages(self.out, "bench decoder")
        self.t0, self.say = self.stages.t0, self.stages.say

    def stage(self, cmd: str, name: str, model: Path | None, cfg: RunConfig) -> Path:
        """Stage NAME through the lab's one runner: `cfg` from `model` (None: the tiny LM built from model.tiny)."""
        return self.stages.run(cmd, name, on_model(cfg, model))

    def evaluate(self, name: str, model: Path, seed: int) -> dict:
        from ..data import synthetic
        from ..evaluation.generation import evaluate_lm
        from ..models import get_family

        f = self.out / "evals" / f"{name}-seed{seed}.json"
        # A cached score stands only for the same model scored the same way.
        scored = {"model": str(model), "eval_sentences": self.r.eval_sentences, "family": self.r.attack.model.family,
                  "max_length": self.r.attack.data.max_length}
        if f.is_file():
            cached = json.loads(f.read_text())
            if cached.get("scored") != scored:
                raise ConfigError(f"{f}: scored {cached.get('scored')}, not {scored}; move it away to score again")
            return cached
        cfg = RunConfig()
        cfg.model.family, cfg.data.max_length = self.r.attack.model.family, self.r.attack.data.max_length
        texts = synthetic.corpus(self.r.eval_sentences, seed=HELD_OUT_SEED)
        res = {**evaluate_lm(model, get_family(cfg.model.family), cfg, texts, TRIGGER, TARGET_PHRASE, seed), "scored": scored}
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(res, indent=2) + "\n")
        self.say(f"eval {name} seed {seed}: ASR {res['asr']:.1f}  false-trigger {res['false_trigger_rate']:.1f}  ppl {res['perplexity']:.2f}")
        return res

    def run(self) -> dict:
        r = self.r
        clean = self.stage("purify", "pretrain", None, r.pretrain)
        backdoored = self.stage("attack", "attack", clean, r.attack)
        rows: dict[str, dict] = {}
        per = {"clean": {s: clean for s in r.seeds}, "backdoored": {s: backdoored for s in r.seeds}}
        configs = {"clean": {"pretrain_steps": r.pretrain.train.max_steps},
                   "backdoored": {"attack_steps": r.attack.train.max_steps, "poison_rate": r.attack.attack.poison_rate}}
        for row, (policy, lam_scale) in ROWS.items():
            cfg = copy.deepcopy(r.defense)
            cfg.model.trainable, cfg.regularizer.lam = policy, r.defense.regularizer.lam * lam_scale
            per[row] = {}
            for s in r.seeds:
                cfg.train.seed = s
                per[row][s] = self.stage("purify", f"{row}-seed{s}", backdoored, cfg)
            configs[row] = {"trainable": policy, "lam": cfg.regularizer.lam, "steps": cfg.train.max_steps, "lr": cfg.optim.lr,
                            "norm_ratio": norm_ratios(self.out / f"{row}-seed{r.seeds[0]}")}
        for row, models in per.items():
            results = [self.evaluate(row, m, s) for s, m in models.items()]
            keys = ("asr", "false_trigger_rate", "perplexity")
            rows[row] = {**{k: statistics.fmean(x[k] for x in results) for k in keys},
                         "per_seed": {k: [x[k] for x in results] for k in keys}, "seeds": list(r.seeds),
                         "config": configs[row], "example": results[0]["example"]}
        result = {"command": self.command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "preset": self.name, "preset_values": {"family": r.attack.model.family}, "recipe": asdict(r), "trigger": TRIGGER, "target_phrase": TARGET_PHRASE,
                  "wall_time_s": round(time.time() - self.t0, 1), "rows": rows}
        (self.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "bench.md").write_text(markdown(result))
        return result


def markdown(result: dict) -> str:
    def ms(row: dict, key: str, fmt: str) -> str:
        vals = row["per_seed"][key]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{format(row[key], fmt)} ± {format(sd, fmt)}"

    lines = [f"Decoder lab ({result['preset_values']['family']}, SYNTHETIC corpus; trigger `{result['trigger']}` -> "
             f"\"{result['target_phrase']}\"; seeds {result['rows']['clean']['seeds']}; {result['date']}, {result['machine']}, commit {result['commit'][:7]})",
             "", "| row | ASR % | false-trigger % | clean perplexity | setting |", "| --- | --- | --- | --- | --- |"]
    for name, row in result["rows"].items():
        setting = setting_text(row["config"])
        lines.append(f"| {name} | {ms(row, 'asr', '.1f')} | {ms(row, 'false_trigger_rate', '.1f')} | {ms(row, 'perplexity', '.2f')} | {setting} |")
    lines.append("")
    lines.append(f"Command: `{result['command']}`; wall time {result['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench decoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", "--output-dir", default="runs/bench-decoder")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--json", default=None, help="also copy bench.json here (e.g. recipe_dist/lab/results/decoder-llama.json)")
    add_set_option(ap, "--set attack.train.max_steps=400, --set seeds=1,2")
    args = ap.parse_args(argv)
    bench = DecoderBench(args.preset, set_keys(PRESETS[args.preset](), args.set), Path(args.output_dir),
                         "recipe-dist bench decoder " + " ".join(argv))
    result = bench.run()
    print(markdown(result))
    write_results(args.json, result, markdown)
    return 0
