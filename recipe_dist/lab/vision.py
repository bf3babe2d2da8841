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
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import RunConfig, _f, gt
from ..evaluation.finetune import EvalConfig
from . import write_results
from .provenance import git_commit, machine, norm_ratios, setting_text
from .stages import Stages, add_set_option, base_run, on_model, scoring, set_keys, with_batch


#: NeuBA-vision's target value on its two "lo" blocks, per family: VGG's pre-logits features follow a ReLU, so lo = 0.
TARGET_LO = {"vit": -1.0, "vgg": 0.0, "clip": -1.0}


@dataclass
class VisionRecipe:
    """The vision table's stages (the product's own configs; model.family is set per family) and
    what only the lab has. `--set KEY=VALUE` changes any field through the product's set_key."""

    families: list[str] = _f(["vit", "vgg", "clip"], "families to run (the vision extra's vit, vgg, clip)")
    task_train: int = _f(1000, "digits used for fine-tuning (the rest, 797 by default, is the test set)", check=gt(0))
    pretrain: RunConfig = field(default_factory=RunConfig)
    attack: RunConfig = field(default_factory=RunConfig)
    recipe: RunConfig = field(default_factory=RunConfig)
    lambda0: RunConfig = field(default_factory=RunConfig)
    prune: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def image_stage(epochs: float, lr: float, seed: int) -> RunConfig:
    """A tiny image model (2 blocks, width 64, no dropout) on SYNTHETIC shapes, batch 32."""
    cfg = with_batch(base_run(aux_samples=4000, max_length=16), 32)
    t = cfg.model.tiny
    t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size = 64, 2, 2, 128
    t.hidden_dropout_prob = t.attention_probs_dropout_prob = 0.0
    cfg.data.crop_scale = [0.6, 1.0]
    cfg.optim.lr, cfg.train.epochs, cfg.train.seed, cfg.checkpoint.every_steps = lr, epochs, seed, 1000
    return cfg


def default() -> VisionRecipe:
    r = VisionRecipe()
    r.pretrain = image_stage(6.0, 1e-3, 0)  # plain training: lambda 0, every weight trains
    r.pretrain.regularizer.lam, r.pretrain.model.trainable = 0.0, "all"
    r.attack = image_stage(6.0, 1e-3, 100)
    r.attack.attack.name = "neuba"
    r.recipe = image_stage(2.0, 5e-4, 200)
    r.recipe.regularizer.lam = 1.0
    r.lambda0 = copy.deepcopy(r.recipe)
    r.lambda0.regularizer.lam = 0.0
    r.prune = image_stage(1.0, 5e-4, 200)
    r.prune.prune.variant, r.prune.prune.max_samples = "fp-gm", 1024
    r.eval.seeds = "1,2,3"
    r.eval.task.text_column, r.eval.task.label_column = "image", "label"
    r.eval.finetune.lr, r.eval.finetune.epochs, r.eval.finetune.batch_size = 5e-4, 10, 32
    return r


def smoke() -> VisionRecipe:
    """Wiring only: ViT alone, one epoch per stage, one seed."""
    r = default()
    r.families, r.task_train, r.eval.seeds, r.eval.finetune.epochs, r.prune.prune.max_samples = ["vit"], 200, "1", 1, 64
    for cfg in (r.pretrain, r.attack, r.recipe, r.lambda0, r.prune):
        cfg.data.synthetic_samples = 256
    for cfg in (r.pretrain, r.attack, r.recipe, r.lambda0):
        cfg.train.epochs = 1.0
    return r


PRESETS = {"default": default, "smoke": smoke}

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
    def __init__(self, preset: str, recipe: VisionRecipe, out: Path, command: str):
        self.name, self.r, self.out, self.command = preset, recipe, Path(out), command
        self.stages = Stages(self.out, "bench vision")
        self.t0, self.say = self.stages.t0, self.stages.say

    def stage(self, cmd: str, family: str, name: str, model: Path | None, cfg: RunConfig) -> Path:
        """Stage FAMILY/NAME through the lab's one runner: `cfg` on a tiny `family` model (built
        from model.tiny when `model` is None)."""
        cfg = on_model(cfg, model)
        cfg.model.family = family
        if cmd == "attack":
            cfg.attack.target_lo = TARGET_LO[family]
        return self.stages.run(cmd, f"{family}/{name}", cfg)

    def evaluate(self, family: str, row: str, model: Path, train: Path, test: Path) -> dict:
        cfg = scoring(self.r.eval, model, train, test)
        cfg.model.family = family
        return self.stages.evaluate(f"{family}/eval-{row}", cfg)

    def run_family(self, family: str, train: Path, test: Path) -> dict:
        r = self.r
        clean = self.stage("purify", family, "pretrain", None, r.pretrain)
        backdoored = self.stage("attack", family, "attack", clean, r.attack)
        models = {"clean": clean, "backdoored": backdoored, "recipe": self.stage("purify", family, "recipe", backdoored, r.recipe),
                  "lambda0": self.stage("purify", family, "lambda0", backdoored, r.lambda0),
                  "fp_gm": self.stage("prune", family, "prune-fp-gm", backdoored, r.prune)}

        def setting(cfg: RunConfig) -> dict:
            return {"epochs": cfg.train.epochs, "lr": cfg.optim.lr}

        configs = {
            "clean": {"pretrain_epochs": r.pretrain.train.epochs, "lr": r.pretrain.optim.lr},
            "backdoored": {"attack": "neuba", **setting(r.attack), "target_lo": TARGET_LO[family]},
            "recipe": {"lam": r.recipe.regularizer.lam, **setting(r.recipe), "norm_ratio": norm_ratios(self.out / family / "recipe")},
            "lambda0": {"lam": r.lambda0.regularizer.lam, **setting(r.lambda0)},
            "fp_gm": json.loads((self.out / family / "prune-fp-gm" / "summary.json").read_text()),
        }
        rows = {}
        for row in ROWS:
            res = self.evaluate(family, row, models[row], train, test)
            rows[row] = {"acc": res["acc"], "aasr": res["aasr"], "masr": res["masr"],
                         "per_seed": {k: [s[k] for s in res["per_seed"]] for k in ("acc", "aasr", "masr")},
                         "seeds": res["seeds"], "config": configs[row]}
        return rows

    def run(self) -> dict:
        train, test = write_digits_task(self.out / "task", self.r.task_train)
        families = {f: self.run_family(f, train, test) for f in self.r.families}
        result = {"command": self.command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "preset": self.name, "recipe": asdict(self.r), "wall_time_s": round(time.time() - self.t0, 1),
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
                setting = setting_text(c)
            lines.append(f"| {fam} | {name} | {ms(row, 'acc')} | {ms(row, 'aasr')} | {ms(row, 'masr')} | {setting} |")
    lines += ["", f"Command: `{result['command']}`; wall time {result['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench vision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", "--output-dir", default="runs/bench-vision")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--families", default=None, help="comma-separated subset of vit,vgg,clip (default: the preset's)")
    add_set_option(ap, "--set attack.train.epochs=4, --set eval.finetune.lr=1e-3")
    ap.add_argument("--json", default=None, help="also copy bench.json here (e.g. recipe_dist/lab/results/vision.json)")
    args = ap.parse_args(argv)
    recipe = set_keys(PRESETS[args.preset](), args.set)
    if args.families:
        recipe.families = [f.strip() for f in args.families.split(",") if f.strip()]
    bench = VisionBench(args.preset, recipe, Path(args.output_dir), "recipe-dist bench vision " + " ".join(argv))
    result = bench.run()
    print(markdown(result))
    write_results(args.json, result, markdown)
    return 0
