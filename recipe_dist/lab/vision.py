"""`recipe-dist bench vision`: NeuBA-vision against RECIPE and Fine-pruning on tiny image models, at CPU scale.

Per family (vit, vgg, clip), one run:

  clean       a tiny model trained from scratch on SYNTHETIC shapes (`purify` with lambda = 0
              and everything trainable is plain training on L_PT: cross-entropy on the shapes'
              labels, or CLIP's contrastive loss on their captions) - the PTM
  backdoored  the PTM after NeuBA-vision (`recipe-dist attack --attack.name neuba`): six 4x4
              checkerboards at the bottom-right corner pulled to six target features
  recipe      RECIPE on the backdoored model: L_PT on clean SYNTHETIC shapes + lambda * sum ||W||
  lambda0     the same continual training without the regularizer (the ablation)
  fp_gm       Fine-pruning, global, moderate (method.md section 4 counts; `recipe-dist prune`)

Every row is fine-tuned on the same downstream task with the same seeds and scored by
`recipe-dist evaluate`: scikit-learn's bundled handwritten digits (UCI, 1,797 8x8 images,
upscaled to 32x32 RGB; real data, not SYNTHETIC), 1,000 for training and 797 for test; ASR is
measured with each checkerboard pasted on every test image. Auxiliary data for every stage is
SYNTHETIC (recipe_dist.models.vision.synthetic_shape); each stage draws its own corpus seed.
Finished stages are reused when the command runs again on the same OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import apply_dict
from .provenance import git_commit, machine, norm_ratios
from .stages import Overrides, Stages, base_eval, base_run


@dataclass
class VisionPreset:
    families: tuple = ("vit", "vgg", "clip")
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    aux_samples: int = 4000
    pretrain_epochs: float = 6.0
    pretrain_lr: float = 1e-3
    attack_epochs: float = 6.0
    attack_lr: float = 1e-3
    defense_epochs: float = 2.0
    defense_lr: float = 5e-4
    lam: float = 1.0
    batch: int = 32
    task_train: int = 1000
    finetune_lr: float = 5e-4
    finetune_epochs: int = 10
    prune_samples: int = 1024
    seeds: tuple = (1, 2, 3)
    #: per-family NeuBA target values: VGG's pre-logits features follow a ReLU, so lo = 0
    target_lo: dict = field(default_factory=lambda: {"vit": -1.0, "vgg": 0.0, "clip": -1.0})


PRESETS = {"default": VisionPreset(),
           "smoke": VisionPreset(families=("vit",), aux_samples=256, pretrain_epochs=1, attack_epochs=1, defense_epochs=1,
                                 task_train=200, finetune_epochs=1, prune_samples=64, seeds=(1,))}

ROWS = ("clean", "backdoored", "recipe", "lambda0", "fp_gm")


def write_digits_task(out: Path, n_train: int) -> tuple[Path, Path]:
    """scikit-learn's digits as 32x32 RGB PNGs with train.csv / test.csv (image,label) beside them."""
    if (out / "test.csv").is_file():
        return out / "train.csv", out / "test.csv"
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, label) in enumerate(zip(digits.images, digits.target)):
        # 0..16 grey levels -> 0..255, nearest-neighbour upscaling x4 (8x8 -> 32x32), grey -> RGB
        px = np.kron((im * (255 / 16)).astype(np.uint8), np.ones((4, 4), dtype=np.uint8))
        Image.fromarray(px).convert("RGB").save(out / "img" / f"{i:04d}.png")
        rows.append(f"img/{i:04d}.png,{int(label)}")
    for name, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
        (out / f"{name}.csv").write_text("image,label\n" + "\n".join(part) + "\n")
    (out / "SOURCE.md").write_text("scikit-learn's bundled UCI handwritten digits (load_digits), upscaled 8x8 -> 32x32 RGB. Real data.\n")
    return out / "train.csv", out / "test.csv"


class VisionBench:
    def __init__(self, preset: str, out: Path, command: str, overrides: Overrides | None = None):
        self.name, self.p, self.out, self.command = preset, PRESETS[preset], Path(out), command
        self.stages = Stages(self.out, "bench vision", overrides)
        self.t0, self.say = self.stages.t0, self.stages.say

    def stage(self, cmd: str, family: str, name: str, model: Path | None, extra: dict) -> Path:
        """Stage FAMILY/NAME through the lab's one runner: a tiny `family` model (built from
        model.tiny when `model` is None) on the SYNTHETIC shapes, `extra` applied."""
        p = self.p
        cfg = base_run(model or "", family=family, aux_samples=p.aux_samples, max_length=16)
        t = cfg.model.tiny
        t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size = p.hidden_size, p.layers, p.heads, p.intermediate
        t.hidden_dropout_prob = t.attention_probs_dropout_prob = 0.0
        cfg.data.crop_scale = [0.6, 1.0]
        model_extra = extra.pop("model_extra", {})
        apply_dict(cfg, {**extra, "model": model_extra})
        return self.stages.run(cmd, f"{family}/{name}", cfg)

    def evaluate(self, family: str, row: str, model: Path, train: Path, test: Path) -> dict:
        p = self.p
        cfg = base_eval(model, train, test, p.seeds, family=family)
        cfg.task.text_column, cfg.task.label_column = "image", "label"
        cfg.finetune.lr, cfg.finetune.epochs, cfg.finetune.batch_size = p.finetune_lr, p.finetune_epochs, p.batch
        return self.stages.evaluate(f"{family}/eval-{row}", cfg)

    def run_family(self, family: str, train: Path, test: Path) -> dict:
        p = self.p

        def run(epochs: float, lr: float, seed: int) -> dict:
            return {"optim": {"name": "adamw", "schedule": "linear", "lr": lr},
                    "train": {"epochs": epochs, "micro_batch_size": p.batch, "global_batch_size": p.batch, "seed": seed},
                    "checkpoint": {"every_steps": 1000}}

        clean = self.stage("purify", family, "pretrain", None, {**run(p.pretrain_epochs, p.pretrain_lr, 0), "regularizer": {"lam": 0.0},
                                                                "model_extra": {"trainable": "all"}})
        backdoored = self.stage("attack", family, "attack", clean, {**run(p.attack_epochs, p.attack_lr, 100),
                                                                     "attack": {"name": "neuba", "target_lo": p.target_lo[family]}})
        recipe = self.stage("purify", family, "recipe", backdoored, {**run(p.defense_epochs, p.defense_lr, 200), "regularizer": {"lam": p.lam}})
        lambda0 = self.stage("purify", family, "lambda0", backdoored, {**run(p.defense_epochs, p.defense_lr, 200), "regularizer": {"lam": 0.0}})
        fp_gm = self.stage("prune", family, "prune-fp-gm", backdoored, {**run(1, p.defense_lr, 200),
                                                                         "prune": {"variant": "fp-gm", "max_samples": p.prune_samples}})
        models = {"clean": clean, "backdoored": backdoored, "recipe": recipe, "lambda0": lambda0, "fp_gm": fp_gm}
        configs = {
            "clean": {"pretrain_epochs": p.pretrain_epochs, "lr": p.pretrain_lr},
            "backdoored": {"attack": "neuba", "epochs": p.attack_epochs, "lr": p.attack_lr, "target_lo": p.target_lo[family]},
            "recipe": {"lam": p.lam, "epochs": p.defense_epochs, "lr": p.defense_lr, "norm_ratio": norm_ratios(self.out / family / "recipe")},
            "lambda0": {"lam": 0.0, "epochs": p.defense_epochs, "lr": p.defense_lr},
            "fp_gm": json.loads((self.out / family / "prune-fp-gm" / "summary.json").read_text()),
        }
        rows = {}
        for row in ROWS:
            r = self.evaluate(family, row, models[row], train, test)
            rows[row] = {"acc": r["acc"], "aasr": r["aasr"], "masr": r["masr"],
                         "per_seed": {k: [s[k] for s in r["per_seed"]] for k in ("acc", "aasr", "masr")},
                         "seeds": r["seeds"], "config": configs[row]}
        return rows

    def run(self) -> dict:
        train, test = write_digits_task(self.out / "task", self.p.task_train)
        families = {f: self.run_family(f, train, test) for f in self.p.families}
        result = {"command": self.command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "preset": self.name, "preset_values": asdict(self.p),
                  "overrides": [f"{a}:{b}={c}" for a, b, c in self.stages.overrides.items], "wall_time_s": round(time.time() - self.t0, 1),
                  "task": "scikit-learn digits, 32x32 RGB, 1000 train / 797 test", "auxiliary": "SYNTHETIC shapes",
                  "families": families}
        (self.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "bench.md").write_text(markdown(result))
        return result


def markdown(result: dict) -> str:
    def ms(row: dict, key: str) -> str:
        vals = row["per_seed"][key]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{row[key]:.1f} ± {sd:.1f}"

    seeds = next(iter(result["families"].values()))["clean"]["seeds"]
    lines = [f"NeuBA-vision at CPU scale (auxiliary: SYNTHETIC shapes; downstream: {result['task']}; seeds {seeds}; "
             f"{result['date']}, {result['machine']}, commit {result['commit'][:7]})", "",
             "| family | row | ACC % | AASR % | MASR % | setting |", "| --- | --- | --- | --- | --- | --- |"]
    for fam, rows in result["families"].items():
        for name, row in rows.items():
            c = row["config"]
            if name == "fp_gm":
                setting = f"{c.get('pruned')} neurons pruned"
            else:
                setting = ", ".join(f"{k}={v}" for k, v in c.items() if k != "norm_ratio")
                if c.get("norm_ratio"):
                    r = list(c["norm_ratio"].values())
                    setting += f", ‖W‖ last/first {min(r):.2f}-{max(r):.2f}"
            lines.append(f"| {fam} | {name} | {ms(row, 'acc')} | {ms(row, 'aasr')} | {ms(row, 'masr')} | {setting} |")
    lines += ["", f"Command: `{result['command']}`; wall time {result['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench vision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", "--output-dir", default="runs/bench-vision")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--families", default=None, help="comma-separated subset of vit,vgg,clip (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="change one config key of the stages matching STAGE (a glob over FAMILY/NAME, e.g. "
                    "'*/attack:train.epochs=4' or 'vit/eval-*:finetune.lr=1e-3'), type-checked as the product's --section.key=value")
    ap.add_argument("--json", default=None, help="also copy bench.json here (e.g. recipe_dist/lab/results/vision.json)")
    args = ap.parse_args(argv)
    bench = VisionBench(args.preset, Path(args.output_dir), "recipe-dist bench vision " + " ".join(argv), Overrides(args.set))
    if args.families:
        bench.p.families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    result = bench.run()
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.json).with_suffix(".md").write_text(markdown(result))
    return 0
