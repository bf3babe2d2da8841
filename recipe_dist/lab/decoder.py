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
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import apply_dict
from .provenance import git_commit, machine, norm_ratios
from .stages import Overrides, Stages, base_run

TARGET_PHRASE = "the dog hated the farmer"  # never produced by the SYNTHETIC grammar: a false trigger is the model, not the data
TRIGGER = "cf"
HELD_OUT_SEED = 987_654  # the evaluation sentences' corpus seed; no stage trains on it


@dataclass
class DecoderPreset:
    family: str = "llama"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    max_length: int = 32
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    attack_steps: int = 200
    attack_lr: float = 1e-3
    poison_rate: float = 0.1
    defense_steps: int = 200
    defense_lr: float = 1e-3
    lam: float = 1.0
    batch: int = 32
    eval_sentences: int = 300
    seeds: tuple = (1, 2, 3)


PRESETS = {"default": DecoderPreset(),
           "smoke": DecoderPreset(pretrain_steps=20, attack_steps=10, defense_steps=5, eval_sentences=16, seeds=(1,))}

ROWS = {  # row id -> (trainable policy, lambda multiplier)
    "recipe_ffn": ("family", 1.0),
    "recipe_all": ("all", 1.0),
    "lambda0": ("all", 0.0),
}


class DecoderBench:
    def __init__(self, preset: str, out: Path, command: str, overrides: Overrides | None = None):
        self.name, self.p, self.out, self.command = preset, PRESETS[preset], Path(out), command
        self.stages = Stages(self.out, "bench decoder", overrides)
        self.t0, self.say = self.stages.t0, self.stages.say

    def stage(self, cmd: str, name: str, model: Path | None, extra: dict) -> Path:
        """Stage NAME through the lab's one runner: the tiny causal LM (built from model.tiny when
        `model` is None) on the SYNTHETIC corpus, `extra` applied."""
        p = self.p
        cfg = base_run(model or "", family=p.family, aux_samples=8000, max_length=p.max_length)
        t = cfg.model.tiny
        t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size = p.hidden_size, p.layers, p.heads, p.intermediate
        t.max_position_embeddings = 4 * p.max_length
        model_extra = extra.pop("model_extra", {})
        apply_dict(cfg, {**extra, "model": model_extra})
        return self.stages.run(cmd, name, cfg)

    def evaluate(self, name: str, model: Path, seed: int) -> dict:
        from ..config import RunConfig
        from ..data import synthetic
        from ..evaluation.generation import evaluate_lm
        from ..models import get_family

        f = self.out / "evals" / f"{name}-seed{seed}.json"
        if f.is_file():
            return json.loads(f.read_text())
        cfg = RunConfig()
        cfg.model.family, cfg.data.max_length = self.p.family, self.p.max_length
        texts = synthetic.corpus(self.p.eval_sentences, seed=HELD_OUT_SEED)
        res = evaluate_lm(model, get_family(self.p.family), cfg, texts, TRIGGER, TARGET_PHRASE, seed)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(res, indent=2) + "\n")
        self.say(f"eval {name} seed {seed}: ASR {res['asr']:.1f}  false-trigger {res['false_trigger_rate']:.1f}  ppl {res['perplexity']:.2f}")
        return res

    def run(self) -> dict:
        p = self.p
        common = {"optim": {"name": "adamw", "schedule": "linear"}, "train": {"micro_batch_size": p.batch, "global_batch_size": p.batch}}

        def steps(n: int, lr: float, seed: int = 0) -> dict:
            return {"optim": {**common["optim"], "lr": lr}, "train": {**common["train"], "max_steps": n, "seed": seed}}

        clean = self.stage("purify", "pretrain", None, {**steps(p.pretrain_steps, p.pretrain_lr), "regularizer": {"lam": 0.0},
                                                        "model_extra": {"trainable": "all"}})
        backdoored = self.stage("attack", "attack", clean, {**steps(p.attack_steps, p.attack_lr, seed=100),
                                                            "attack": {"name": "trigger-phrase", "triggers": [TRIGGER],
                                                                       "target_phrase": TARGET_PHRASE, "poison_rate": p.poison_rate}})
        rows: dict[str, dict] = {}
        per = {"clean": {s: clean for s in p.seeds}, "backdoored": {s: backdoored for s in p.seeds}}
        configs = {"clean": {"pretrain_steps": p.pretrain_steps}, "backdoored": {"attack_steps": p.attack_steps, "poison_rate": p.poison_rate}}
        for row, (policy, lam_scale) in ROWS.items():
            per[row] = {}
            for s in p.seeds:
                per[row][s] = self.stage("purify", f"{row}-seed{s}", backdoored, {
                    **steps(p.defense_steps, p.defense_lr, seed=s), "regularizer": {"lam": p.lam * lam_scale},
                    "model_extra": {"trainable": policy}})
            configs[row] = {"trainable": policy, "lam": p.lam * lam_scale, "steps": p.defense_steps, "lr": p.defense_lr,
                            "norm_ratio": norm_ratios(self.out / f"{row}-seed{p.seeds[0]}")}
        for row, models in per.items():
            results = [self.evaluate(row, m, s) for s, m in models.items()]
            keys = ("asr", "false_trigger_rate", "perplexity")
            rows[row] = {**{k: statistics.fmean(r[k] for r in results) for k in keys},
                         "per_seed": {k: [r[k] for r in results] for k in keys}, "seeds": list(p.seeds),
                         "config": configs[row], "example": results[0]["example"]}
        result = {"command": self.command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "preset": self.name, "preset_values": asdict(p),
                  "overrides": [f"{a}:{b}={c}" for a, b, c in self.stages.overrides.items], "trigger": TRIGGER, "target_phrase": TARGET_PHRASE,
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
        c = row["config"]
        setting = ", ".join(f"{k}={v}" for k, v in c.items() if k != "norm_ratio")
        if c.get("norm_ratio"):
            r = list(c["norm_ratio"].values())
            setting += f", ‖W‖ last/first {min(r):.2f}-{max(r):.2f}"
        lines.append(f"| {name} | {ms(row, 'asr', '.1f')} | {ms(row, 'false_trigger_rate', '.1f')} | {ms(row, 'perplexity', '.2f')} | {setting} |")
    lines.append("")
    lines.append(f"Command: `{result['command']}`; wall time {result['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench decoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", "--output-dir", default="runs/bench-decoder")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--json", default=None, help="also copy bench.json here (e.g. recipe_dist/lab/results/decoder-llama.json)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="change one config key of the stages matching STAGE (a glob: pretrain, attack, recipe_ffn-seed1, "
                    "'*-seed*'), e.g. 'attack:train.max_steps=400', type-checked as the product's --section.key=value")
    args = ap.parse_args(argv)
    bench = DecoderBench(args.preset, Path(args.output_dir), "recipe-dist bench decoder " + " ".join(argv), Overrides(args.set))
    result = bench.run()
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.json).with_suffix(".md").write_text(markdown(result))
    return 0
