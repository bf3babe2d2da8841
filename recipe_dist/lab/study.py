"""`recipe-dist bench study --preset NAME`: the replicated defense study (issue 25).

The unit of a claim is the purification: every defense row is purified with several training
seeds (`purify_seeds`), each purified model is fine-tuned with several seeds (`eval.seeds`) and
scored on the reported split; the clean and backdoored rows are scored with the same fine-tuning
seeds. For every comparison the recipe names, the paired mean difference over purifications
(each purification's mean over its fine-tuning seeds), its 95% t interval and p (lab/stats.py).

Data kept apart, as the reviewer's protocol asks:
- the PTM (`minilm-mlm`): MiniLM-L6 masked-LM trained on WikiText-2 *valid* (`fit-head`, the
  head first, then `--fit_head.scope=all`), scored on a held-out slice of it;
- the attacker reads WikiText-2 *test* in 64-word chunks; the defender reads only BookCorpus;
- fine-tuning reads SST-2 train minus its last `holdout` rows (OUTPUT/task/heldout.tsv).
Two phases, in this order:
1. `--set split=heldout`: every row scored on the held-out slice with `selection_seeds`
   (classifiers other than the reported ones); the attack's gate (probe of the backdoored PTM's
   pooler on triggered held-out sentences, its held-out AASR; a miss stops the study before any
   purification) and the pre-registered selections
   (`select`: the recommended setting; `choose_rho`: Fine-mixing's rho on clean held-out
   accuracy) are recorded in study.json. Only the rows the selection reads are scored here.
   Commit that file. With `--set selection_from=OTHER_HELD_OUT_JSON` (committed) the phase adopts
   that study's recommended setting instead (one product setting, selected on one attack and
   tested on the others) and scores only the gate, the victims and Fine-mixing's rho.
2. `--set split=test --set selection_file=THAT_FILE`: refused unless the file is committed and
   unchanged; test.tsv is then scored once with the reported seeds for every row (the twins,
   FP-GM, Fine-mixing + E-PUR at the frozen rho, and against POR the adaptive attack purified
   both ways), and the table records the file's commit. Purifications are shared by the phases.
The `smoke` preset runs the same stages on the SYNTHETIC tiny PTM (wiring only).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import NOT_EMPTY, ConfigError, RunConfig, _f, ge, gt
from ..errors import RecipeError
from ..evaluation.finetune import EvalConfig
from .provenance import git_commit, machine
from .stages import Stages, add_set_option, base_run, finemix_run, on_model, scoring, set_keys, with_batch
from .defense.recipes import BERT_FFN
from .stats import established, paired

METRICS = ("acc", "aasr", "masr")


@dataclass
class StudyRecipe:
    """Every input of the study: the product's own stage configs plus the replication plan."""

    ptm: str = _f("tiny", "minilm-mlm (MiniLM-L6 masked-LM trained on WikiText-2 valid) or tiny (SYNTHETIC, wiring only)")
    ptm_model: str = _f("", "an MLM-trained PTM made earlier by `fit-head` (its fit_head.json beside it): skips the mlm stages")
    split: str = _f("heldout", "heldout (selection phase: the held-out slice, scored with selection_seeds) or test (the "
                    "reported phase: test.tsv, read once, only with a committed selection_file)")
    selection_seeds: str = _f("11,12", "fine-tuning seeds of the held-out phase: other classifiers than the reported eval.seeds")
    selection_file: str = _f("", "split=test: the committed study.json of the held-out phase (its selection is what is scored)")
    selection_from: str = _f("", "split=heldout: adopt the recommended setting of another attack's committed held-out study.json "
                             "instead of selecting here (the product recommends one setting: a defender does not know the "
                             "attack); this phase then scores the gate, the victims and Fine-mixing's rho only")
    holdout: int = _f(872, "the last rows of SST-2 train kept out of fine-tuning: the held-out slice for selection", check=gt(0))
    purify_seeds: list[int] = _f([1, 2, 3], "training seeds: one independent purification per seed and defense row", check=NOT_EMPTY)
    recommended: str = _f("recommended", "the row the product recommends")
    mlm_head: RunConfig = field(default_factory=RunConfig)
    mlm: RunConfig = field(default_factory=RunConfig)
    attack: RunConfig = field(default_factory=RunConfig)
    reference: RunConfig = field(default_factory=RunConfig)
    recommended_setting: RunConfig = field(default_factory=RunConfig)
    fp_gm: RunConfig = field(default_factory=RunConfig)
    finemix: RunConfig = field(default_factory=RunConfig)
    finemix_samples: int = _f(300, "Fine-mixing: the first N rows of the fine-tuning file are the defender's small clean subset", check=gt(0))
    finemix_rhos: list[float] = _f([0.1, 0.3, 0.5, 0.7, 0.9], "Fine-mixing: the rho grid the held-out phase chooses from "
                                   "(the smallest whose clean held-out ACC is within ACC_BUDGET of the victims')", check=NOT_EMPTY)
    gate_aasr: float = _f(90.0, "the attack's gate: held-out AASR of the backdoored PTM on the first selection seed; below it "
                          "the held-out phase stops before any purification (0: no gate)", check=ge(0))
    gate_pooler: float = _f(0.95, "POR's gate: mean |pooler| of the backdoored PTM on triggered held-out sentences (0: no gate)", check=ge(0))
    adaptive_lam: float = _f(1.0, "POR only: the adaptive attack's lambda_adv over the reference's regularized weights (paper "
                             "Table 7; 0 leaves the adaptive rows out)", check=ge(0))
    eval: EvalConfig = field(default_factory=EvalConfig)


# Row id -> (the recipe field holding its purification, lambda); the twins differ only in lambda.
DEFENSES = {"reference": ("reference", 1.0), "reference_lambda0": ("reference", 0.0),
            "recommended": ("recommended_setting", 1.0), "recommended_lambda0": ("recommended_setting", 0.0)}
# The held-out phase scores only what its selection reads; the test phase scores every row.
SELECTION_ROWS = ("reference", "recommended", "recommended_lambda0")
COMPARISONS = [("reference", "reference_lambda0"), ("recommended", "recommended_lambda0"), ("recommended", "reference"),
               ("reference", "fp_gm"), ("recommended", "fp_gm"), ("reference", "finemix_epur"), ("recommended", "finemix_epur"),
               ("reference", "backdoored"), ("recommended", "backdoored"), ("fp_gm", "backdoored"), ("finemix_epur", "backdoored"),
               ("adaptive_reference", "adaptive_backdoored"), ("adaptive_recommended", "adaptive_backdoored")]


def minilm_mlm_por() -> StudyRecipe:
    """The study against POR at the reference protocol (method.md; issue 25)."""
    r = StudyRecipe(ptm="minilm-mlm")
    r.mlm_head = with_batch(base_run(max_length=128), 32)  # the head alone first: it starts random
    r.mlm_head.optim.lr, r.mlm_head.optim.warmup_steps, r.mlm_head.train.epochs, r.mlm_head.regularizer.lam = 1e-3, 50, 2.0, 0.0
    r.mlm = copy.deepcopy(r.mlm_head)
    # The whole model at a constant lr 5e-5 for the recorded curve's plateau (results/minilm-mlm-curve.md,
    # run in 2-epoch stages: held-out loss lowest after 6-8 whole-model epochs, accuracy 26.7-27.4%).
    r.mlm.fit_head.scope, r.mlm.optim.lr, r.mlm.optim.schedule, r.mlm.optim.warmup_steps, r.mlm.train.epochs = "all", 5e-5, "constant", 0, 8.0
    # POR as the reference attacks: 64-word chunks at length 128, L1 over every row; lr 5e-5, batch 16.
    r.attack = with_batch(base_run(max_length=128), 16)
    r.attack.attack.name, r.attack.optim.lr, r.attack.train.max_steps, r.attack.checkpoint.every_steps = "por", 5e-5, 3000, 250
    # RECIPE at the reference budget: FFN-in regularized and trained, lr 2e-5, 4 epochs, batch 32, length 64.
    r.reference = with_batch(base_run(max_length=64), 32)
    r.reference.optim.lr, r.reference.train.epochs = 2e-5, 4.0
    # The recommended setting as configs/bert-recommended.yaml ships it (FFN in+out, all trains, lr 1e-4, 1 epoch);
    # the study's held-out selection on the MLM-trained PTM may replace it before the test split is read.
    r.recommended_setting = copy.deepcopy(r.reference)
    r.recommended_setting.model.regularized, r.recommended_setting.model.trainable = list(BERT_FFN), "all"
    r.recommended_setting.optim.lr, r.recommended_setting.train.epochs = 1e-4, 1.0
    # FP-GM (method.md section 4): 4 of BERT-base's 12 layers' worth of FFN neurons, scaled to
    # MiniLM's 6. Pruning has no training seed; a replicate ranks the neurons on its own
    # max_samples BookCorpus sentences, drawn by the purification seed.
    r.fp_gm = copy.deepcopy(r.reference)
    r.fp_gm.prune.variant, r.fp_gm.prune.gm_layers, r.fp_gm.prune.max_samples = "fp-gm", 2.0, 6000
    # Fine-mixing + E-PUR (a downstream defense): rho comes from the held-out phase; the mask is
    # drawn, and the small clean subset fine-tuned on, with the purification seed.
    r.finemix = copy.deepcopy(r.reference)
    r.finemix.finemix.epur_topn = 200
    # The reference downstream protocol: lr 2e-5, 3 epochs, batch 32, length 128, two reported fine-tuning seeds.
    r.eval.seeds = "1,2"
    f = r.eval.finetune
    f.lr, f.epochs, f.batch_size, f.max_length, f.max_train_samples = 2e-5, 3, 32, 128, 0
    return r


def minilm_mlm_badpre() -> StudyRecipe:
    """The same study against BadPre (8 purification epochs at the reference budget, method.md)."""
    r = minilm_mlm_por()
    r.attack.attack.name, r.attack.optim.lr = "badpre", 1e-4
    r.reference.train.epochs = 8.0
    return r


def smoke() -> StudyRecipe:
    """Wiring only: the SYNTHETIC tiny PTM, a few steps per stage, two purifications."""
    r = minilm_mlm_por()
    r.ptm, r.holdout, r.purify_seeds = "tiny", 32, [1, 2]
    for cfg in (r.attack, r.reference, r.recommended_setting, r.fp_gm, r.finemix):
        cfg.data.max_length, cfg.data.synthetic_samples, cfg.model.trainable = 32, 256, "all"
    r.attack.train.max_steps, r.attack.optim.lr = 8, 3e-4
    for cfg in (r.reference, r.recommended_setting):
        cfg.train.max_steps, cfg.optim.lr = 4, 1e-3
    r.fp_gm.prune.gm_layers, r.fp_gm.prune.max_samples = 0.5, 64  # the tiny PTM has 2 layers
    # One rho: the smoke checks the wiring (pick_rho's rule has its own fast test); each rho
    # costs two `recipe-dist finemix` processes.
    r.finemix_samples, r.finemix_rhos = 32, [0.5]
    r.gate_aasr = r.gate_pooler = 0.0  # a few poisoning steps on the tiny PTM saturate nothing
    r.eval.finetune.epochs, r.eval.finetune.max_length, r.eval.finetune.max_train_samples = 1, 32, 96
    return r


PRESETS = {"minilm-mlm-por": minilm_mlm_por, "minilm-mlm-badpre": minilm_mlm_badpre, "smoke": smoke}


class Study:
    def __init__(self, name: str, recipe: StudyRecipe, out: Path, data: Path, command: str = ""):
        self.name, self.r, self.out, self.data, self.command = name, recipe, Path(out), Path(data), command
        self.stages = Stages(self.out, "bench study")

    # ------------------------------------------------------------------ inputs
    def shards(self, name: str, argv: list[str]) -> tuple[Path, int]:
        """`recipe-dist shards ARGV --output OUT/data/NAME/shard` once: (the shard prefix, how many)."""
        from ..cli import main

        prefix = self.out / "data" / name / "shard"
        if not (prefix.parent / "manifest.json").is_file():
            if main(["shards", *argv, "--output", str(prefix)]) != 0:
                raise RecipeError(f"bench study: `recipe-dist shards {' '.join(argv)}` failed")
        return prefix, len(json.loads((prefix.parent / "manifest.json").read_text())["shards"])

    def task(self) -> tuple[Path, Path, Path]:
        """(fine-tuning file, held-out slice, reported file)."""
        if self.r.ptm == "tiny":
            from . import demo

            train_all, test = demo.write_task(self.out / "task-src", self.r.eval.finetune.max_train_samples + self.r.holdout, 64)
        else:
            train_all, test = self.data / "sst2" / "train.tsv", self.data / "sst2" / "test.tsv"
        lines = train_all.read_text().splitlines()
        out = self.out / "task"
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.tsv").write_text("\n".join(lines[: len(lines) - self.r.holdout]) + "\n")
        (out / "heldout.tsv").write_text("\n".join([lines[0], *lines[-self.r.holdout:]]) + "\n")
        return out / "train.tsv", out / "heldout.tsv", (out / "heldout.tsv" if self.r.split == "heldout" else test)

    def ptm(self) -> tuple[Path, str, str, dict]:
        """(PTM, attacker shards, defender shards, the masked-LM record)."""
        if self.r.ptm == "tiny":
            from . import demo

            ptm = self.out / "ptm"
            if not (ptm / "pretraining.json").is_file():
                demo.build_ptm(ptm, demo.arch(), 20)
            return ptm, "", "", {}
        from .defense import minilm_path

        wiki, book = self.data / "wikitext2", self.data / "bookcorpus" / "train.tsv"
        prefix, n = self.shards("wikitext-valid", ["--input", str(wiki / "valid.txt"), "--wikitext", "--samples-per-shard", "300"])
        if n < 3:
            raise RecipeError(f"bench study: {prefix}: {n} shards of WikiText-2 valid; training and the held-out slice need 3 or more")
        # The last two shards (330 chunks) are the held-out slice the masked-LM accuracy is scored on.
        train_urls, held_urls = f"{prefix}-{{000000..{n - 3:06d}}}.tar", f"{prefix}-{{{n - 2:06d}..{n - 1:06d}}}.tar"
        attacker = pattern(*self.shards("wikitext-test", ["--input", str(wiki / "test.txt"), "--wikitext", "--samples-per-shard", "500"]))
        defender = pattern(*self.shards("bookcorpus", ["--input", str(book), "--text-column", "sentence", "--samples-per-shard", "2500"]))
        record = {}
        if self.r.ptm_model:
            # A PTM trained earlier by the same fit-head commands (e.g. the recorded curve's stages):
            # its own masked-LM record stands in for the mlm stages'.
            model = Path(self.r.ptm_model)
            report = model.parent / "fit_head.json"
            if not report.is_file():
                raise RecipeError(f"bench study: ptm_model={model}: no fit_head.json beside it (make it with `recipe-dist fit-head`)")
            return model, attacker, defender, {"mlm": json.loads(report.read_text())}
        model = minilm_path()
        for stage, cfg in (("mlm-head", self.r.mlm_head), ("mlm", self.r.mlm)):
            cfg = on_model(cfg, model, train_urls)
            cfg.fit_head.eval_urls = held_urls
            model = self.stages.run("fit-head", stage, cfg, report="fit_head.json")  # written after the model
            record[stage] = json.loads((model.parent / "fit_head.json").read_text())
        return model, attacker, defender, record

    # ------------------------------------------------------------------ rows
    @property
    def seeds(self) -> list[int]:
        """This phase's fine-tuning seeds: the held-out classifiers, or the reported ones."""
        return [int(x) for x in (self.r.selection_seeds if self.r.split == "heldout" else self.r.eval.seeds).split(",")]

    def check_seeds(self) -> None:
        """The held-out phase selects with other classifiers than the ones the test phase reports."""
        held, reported = ({int(x) for x in v.split(",")} for v in (self.r.selection_seeds, self.r.eval.seeds))
        if held & reported:
            raise ConfigError(f"bench study: selection_seeds {self.r.selection_seeds} and eval.seeds {self.r.eval.seeds} "
                              "share a seed; the held-out phase must select with other classifiers than the reported ones")

    def score(self, name: str, model: Path, train: Path, test: Path, *, save_models: bool = False, seed: int | None = None) -> dict:
        """`model` fine-tuned with this phase's seeds (or scored as it is, a classifier of fine-tuning seed `seed`)."""
        cfg = scoring(self.r.eval, model, train, test)
        cfg.seeds, cfg.save_models = ",".join(map(str, self.seeds)), save_models
        if seed is not None:
            cfg.seeds, cfg.finetune.epochs = str(seed), 0
        r = self.stages.evaluate(f"eval-{self.r.split}-{name}", cfg)
        return {**{m: r[m] for m in METRICS}, "per_finetune": {m: [s[m] for s in r["per_seed"]] for m in METRICS}, "seeds": r["seeds"]}

    def row(self, label: str, per_purification: list[dict], config: dict) -> dict:
        return {"label": label, "split": self.r.split, "n_purify": len(per_purification),
                "n_finetune": len(per_purification[0]["seeds"]), **{m: statistics.fmean(p[m] for p in per_purification) for m in METRICS},
                "per_purification": per_purification, "config": config}

    def defense(self, rid: str, backdoored: Path, defender: str, train: Path, test: Path, prefix: str = "") -> dict:
        setting, lam = DEFENSES[rid]
        per = []
        for s in self.r.purify_seeds:
            cfg = on_model(getattr(self.r, setting), backdoored, defender)
            cfg.regularizer.lam, cfg.train.seed = lam, s
            model = self.stages.run("purify", f"{prefix}{rid}-s{s}", cfg)
            per.append({"purify_seed": s, **self.score(f"{prefix}{rid}-s{s}", model, train, test)})
        return self.row(prefix + rid, per, {"setting": setting, "lam": lam, "lr": cfg.optim.lr, "trainable": cfg.model.trainable,
                                            "regularized": list(cfg.model.regularized), "epochs": cfg.train.epochs,
                                            "max_steps": cfg.train.max_steps})

    def fp_gm(self, backdoored: Path, defender: str, train: Path, test: Path) -> dict:
        """FP-GM: `recipe-dist prune` of the backdoored PTM, one replicate per purification seed
        (the seed draws the auxiliary sentences that rank the neurons), then fine-tuned as every row."""
        per = []
        for s in self.r.purify_seeds:
            cfg = on_model(self.r.fp_gm, backdoored, defender)
            cfg.train.seed = s
            model = self.stages.run("prune", f"fp_gm-s{s}", cfg)
            per.append({"purify_seed": s, **self.score(f"fp_gm-s{s}", model, train, test)})
        p = self.r.fp_gm.prune
        return self.row("FP-GM", per, {"defense": "prune", "variant": p.variant, "layers_worth": p.gm_layers, "ranked_on": p.max_samples})

    def victims(self, backdoored: Path, train: Path, test: Path) -> Path:
        """The backdoored PTM fine-tuned with this phase's seeds, kept (seed<F>/model): the classifiers
        a platform's users would deploy, which Fine-mixing starts from. In the test phase they are
        the backdoored row's own; the held-out phase fine-tunes its seeds again, keeping them."""
        name = "backdoored" if self.r.split == "test" else "victims"
        self.score(name, backdoored, train, test, save_models=True)
        return self.out / f"eval-{self.r.split}-{name}"

    def finemixed(self, name: str, victim: Path, clean: Path, train: Path, test: Path, rho: float, seed: int, victim_seed: int) -> dict:
        """`recipe-dist finemix` of one victim (mask and small-subset fine-tuning drawn with `seed`), scored as it is."""
        cfg = finemix_run(self.r.finemix, self.r.eval.finetune, samples=self.r.finemix_samples, seed=seed, clean=clean, train=train)
        cfg.finemix.rho = rho
        model = self.stages.run("finemix", name, on_model(cfg, victim, ""))
        return self.score(name, model, train, test, seed=victim_seed)

    def choose_rho(self, clean: Path, victims: Path, train: Path, held: Path, victims_acc: float) -> dict:
        """Fine-mixing's rho on clean held-out accuracy only (method.md): the smallest rho of the grid
        (the most backdoored deltas reset) whose mean held-out ACC over the victims is within
        ACC_BUDGET of theirs; none within it: the most accurate. Purification seed: the first."""
        s, acc = self.r.purify_seeds[0], {}
        for rho in sorted(self.r.finemix_rhos):
            scores = [self.finemixed(f"finemix_epur-rho{rho:g}-s{s}-v{f}", victims / f"seed{f}" / "model", clean, train, held, rho, s, f)
                      for f in self.seeds]
            acc[f"{rho:g}"] = statistics.fmean(x["acc"] for x in scores)
        return {"rho": pick_rho(acc, victims_acc), "heldout_acc": acc, "victims_heldout_acc": victims_acc,
                "rule": f"smallest rho whose held-out ACC >= the victims' - {ACC_BUDGET}; else the most accurate"}

    def finemix_row(self, clean: Path, victims: Path, train: Path, test: Path, rho: float) -> dict:
        per = []
        for s in self.r.purify_seeds:
            scores = [self.finemixed(f"finemix_epur-s{s}-v{f}", victims / f"seed{f}" / "model", clean, train, test, rho, s, f)
                      for f in self.seeds]
            per.append({"purify_seed": s, **{m: statistics.fmean(x[m] for x in scores) for m in METRICS},
                        "per_finetune": {m: [x[m] for x in scores] for m in METRICS}, "seeds": self.seeds})
        return self.row(f"Fine-mixing + E-PUR (rho {rho:g}; {self.r.finemix_samples} clean task rows)", per,
                        {"defense": "finemix", "rho": rho, "epur_topn": self.r.finemix.finemix.epur_topn,
                         "downstream_clean_samples": self.r.finemix_samples, "victims": "the backdoored row's classifiers"})

    def attack(self, ptm: Path, attacker: str, held: Path, adaptive: bool = False) -> tuple[Path, dict]:
        """The backdoored PTM (the adaptive variant regularizes the reference's weights while
        poisoning) and, for POR, its gate probe."""
        cfg = on_model(self.r.attack, ptm, attacker)
        cfg.train.seed = 100  # the attacker's data order and masks, apart from every purification's
        name = f"attack-{cfg.attack.name}"
        if adaptive:
            cfg.attack.adaptive_lam, cfg.model.regularized, name = self.r.adaptive_lam, list(self.r.reference.model.regularized), name + "-adaptive"
        backdoored = self.stages.run("attack", name, cfg)
        gate = {"probe": self.probe(backdoored, held, cfg)} if cfg.attack.name == "por" else {}
        return backdoored, {"attack": cfg.attack.name, "steps": cfg.train.max_steps, "lr": cfg.optim.lr,
                            "adaptive_lam": cfg.attack.adaptive_lam, **gate}

    def run(self) -> dict:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.frozen = self.check_frozen()  # before test.tsv is opened
        self.adopted = self.check_adopted()
        self.check_seeds()
        train, held, test = self.task()
        ptm, attacker, defender, mlm = self.ptm()
        backdoored, attack = self.attack(ptm, attacker, held)
        test_phase = self.r.split == "test"
        self.finemix_choice: dict = {}
        rows = {"clean": self.row("clean PTM", [self.score("clean", ptm, train, test)], {"mlm": {k: v["after"] for k, v in mlm.items()}}),
                "backdoored": self.row("backdoored", [self.score("backdoored", backdoored, train, test, save_models=test_phase)], attack)}
        self.write(rows)
        if not test_phase:
            self.check_gate(rows["backdoored"])
        for rid in DEFENSES:
            if test_phase or (rid in SELECTION_ROWS and not self.adopted):
                rows[rid] = self.defense(rid, backdoored, defender, train, test)
                self.write(rows)
        victims = self.victims(backdoored, train, test)
        if not test_phase:
            self.finemix_choice = self.choose_rho(ptm, victims, train, held, rows["backdoored"]["acc"])
            return self.write(rows)
        rows["fp_gm"] = self.fp_gm(backdoored, defender, train, test)
        self.write(rows)
        rows["finemix_epur"] = self.finemix_row(ptm, victims, train, test, self.frozen["selection"]["finemix"]["rho"])
        self.write(rows)
        if attack["attack"] == "por" and self.r.adaptive_lam > 0:
            adaptive, config = self.attack(ptm, attacker, held, adaptive=True)
            rows["adaptive_backdoored"] = self.row("backdoored, adaptive attack", [self.score("adaptive_backdoored", adaptive, train, test)], config)
            for rid in ("reference", "recommended"):
                rows[f"adaptive_{rid}"] = self.defense(rid, adaptive, defender, train, test, prefix="adaptive_")
                self.write(rows)
        return self.write(rows)

    def check_gate(self, backdoored: dict) -> None:
        """Purify only a saturated attack (issue 25, item 3): its AASR on the first held-out seed
        and, for POR, its triggered poolers; a miss stops the study with the figures to report."""
        config, aasr = backdoored["config"], backdoored["per_purification"][0]["per_finetune"]["aasr"][0]
        misses = [f"held-out AASR {aasr:.2f} < gate_aasr {self.r.gate_aasr:g}"] if aasr < self.r.gate_aasr else []
        probe = config.get("probe")
        if probe and probe["mean_pooler_abs"] < self.r.gate_pooler:
            misses.append(f"mean |pooler| on triggered inputs {probe['mean_pooler_abs']:.3f} < gate_pooler {self.r.gate_pooler:g}")
        if misses:
            raise RecipeError(f"bench study: the {config['attack']} attack ({config['steps']} steps) missed its gate: {'; '.join(misses)}; "
                              f"nothing was purified (report the miss, or poison longer: --set attack.train.max_steps=N)")

    def probe(self, backdoored: Path, held: Path, attack: RunConfig) -> dict:
        """POR's gate: mean |pooler| of the backdoored PTM on the held-out sentences with each
        trigger inserted once (as `evaluate` inserts it), and the share of dimensions whose sign
        matches the trigger's target. Forward passes only; cached in OUTPUT/probe.json."""
        from ..models import get_family
        from .defense.diagnostics import labelled_texts, probe_model

        cached = self.out / f"probe-{backdoored.parent.name}.json"
        if cached.is_file() and json.loads(cached.read_text()).get("model") == str(backdoored):
            return json.loads(cached.read_text())
        names, texts, labels = labelled_texts(held)
        row = probe_model(get_family(attack.model.family), self.r.eval.finetune.max_length, backdoored, names, texts, labels,
                          asdict(attack.attack), with_head=False)
        out = {"model": str(backdoored), "heldout": str(held), "triggers": row["triggers"],
               "mean_pooler_abs": statistics.fmean(t["pooler_abs"] for t in row["triggers"].values()),
               "mean_sign_agreement": statistics.fmean(t["sign_agreement"] for t in row["triggers"].values())}
        cached.write_text(json.dumps(out, indent=2) + "\n")
        return out

    def check_frozen(self) -> dict:
        """split=test only with a held-out phase's study.json that git has committed, unchanged:
        (its path, commit, selection). The held-out phase needs nothing."""
        if self.r.split == "heldout":
            return {}
        if self.r.split != "test":
            raise RecipeError(f"bench study: split={self.r.split!r}: heldout or test")
        path = Path(self.r.selection_file)
        if not self.r.selection_file or not path.is_file():
            raise RecipeError("bench study: split=test reads test.tsv once, after the settings are frozen: "
                              "--set selection_file=STUDY_JSON (the held-out phase's, committed)")
        commit = committed(path, "commit it before test.tsv is read")
        if path.resolve() == (self.out / "study.json").resolve():
            raise RecipeError(f"bench study: {path}: the test phase writes OUTPUT/study.json; freeze the held-out one elsewhere "
                              "(e.g. lab/results/) and name that copy")
        held = held_out_selection(path)
        # The selection holds only for the recipe it was made on: the same preset and every
        # setting but the phase's own (keys both know; a field added later is not a change).
        was, now = held["recipe"], asdict(self.r)
        changed = sorted(k for k in set(was) & set(now) if k not in ("split", "selection_file", "selection_from") and was[k] != now[k])
        if held.get("preset") != self.name or changed:
            what = f"preset {held.get('preset')!r}, not {self.name!r}" if held.get("preset") != self.name else "other " + ", ".join(changed)
            raise RecipeError(f"bench study: {path}: its selection was made on another recipe ({what}); "
                              "the test phase scores the held-out phase's own settings")
        return {"file": str(path), "commit": commit, "selection": held["selection"]}

    def check_adopted(self) -> dict:
        """split=heldout with selection_from: the other study's committed, decided selection, made
        on the same recommended setting ({file, commit, recommended}); none asked: {}. The
        reference budget is the paper's for each attack (method.md: 4 or 8 epochs), so only the
        whole-model setting must match."""
        if not self.r.selection_from or self.r.split != "heldout":
            return {}
        path = Path(self.r.selection_from)
        if not path.is_file():
            raise RecipeError(f"bench study: selection_from={path}: no such file (another attack's held-out study.json, committed)")
        commit = committed(path, "commit it before adopting its selection")
        held = held_out_selection(path)
        if held["recipe"].get("recommended_setting") != asdict(self.r)["recommended_setting"]:
            raise RecipeError(f"bench study: {path}: its selection was made on another recommended_setting; "
                              "adopt a selection only for the same setting")
        return {"file": str(path), "commit": commit, "preset": held.get("preset"), "recommended": held["selection"]["recommended"]}

    def write(self, rows: dict) -> dict:
        result = {"command": self.command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "preset": self.name, "recommended": self.r.recommended, "recipe": asdict(self.r), "rows": rows,
                  "comparisons": comparisons(rows)}
        if self.r.split == "heldout":
            result["selection"] = select(rows, self.finemix_choice, self.adopted)
            result["recommended"] = result["selection"].get("recommended", self.r.recommended)
        else:
            result["frozen"] = self.frozen
            result["recommended"] = self.frozen["selection"].get("recommended", self.r.recommended)
        (self.out / "study.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "study.md").write_text(markdown(result))
        return result


# The selection rule, fixed (committed) before any held-out number of the MLM-trained PTM existed.
ACC_BUDGET = 2.0  # points of held-out ACC a recommended setting may cost against the backdoored model


def select(rows: dict, finemix: dict | None = None, adopted: dict | None = None) -> dict:
    """Which setting the product recommends, from held-out rows only (issue 25, item 7): the
    whole-model setting (`recommended`) if its AASR is below the paper's reference budget's AND
    below its own lambda=0 twin's, at an ACC cost within ACC_BUDGET; otherwise the reference
    budget (the paper's trainable set). Means over purifications; incomplete rows decide nothing.
    `finemix` is Fine-mixing's rho choice (Study.choose_rho), frozen with it. `adopted`
    (Study.check_adopted): another attack's committed selection, taken as it is."""
    if adopted:
        if not finemix:
            return {"decided": False, "why": "missing: Fine-mixing's rho"}
        return {"decided": True, "recommended": adopted["recommended"], "finemix": finemix,
                "rule": f"adopted from {Path(adopted['file']).name} ({adopted['preset']}, commit {adopted['commit'][:10]})",
                "adopted": adopted}
    need = ("backdoored", *SELECTION_ROWS)
    missing = [k for k in need if k not in rows] + ([] if finemix else ["Fine-mixing's rho"])
    if missing:
        return {"decided": False, "why": "missing: " + ", ".join(missing)}
    rec, ref, twin, bd = (rows[k] for k in ("recommended", "reference", "recommended_lambda0", "backdoored"))
    whole = rec["aasr"] < ref["aasr"] and rec["aasr"] < twin["aasr"] and bd["acc"] - rec["acc"] <= ACC_BUDGET
    return {"decided": True, "recommended": "recommended" if whole else "reference",
            "rule": f"recommended if AASR < reference's and < its lambda=0 twin's and ACC cost <= {ACC_BUDGET}; else reference",
            "figures": {k: {"aasr": rows[k]["aasr"], "acc": rows[k]["acc"]} for k in need}, "finemix": finemix}


def committed(path: Path, why: str) -> str:
    """The commit of `path`, which git must hold unchanged (a frozen selection); else one line."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True).stdout.strip()

    commit = git("log", "-1", "--format=%H", "--", path.name)
    if not commit or git("status", "--porcelain", "--", path.name):
        raise RecipeError(f"bench study: {path}: not committed, or changed since; {why}")
    return commit


def held_out_selection(path: Path) -> dict:
    """A held-out phase's study.json with a decided selection; else one line."""
    held = json.loads(path.read_text())
    if held.get("recipe", {}).get("split") != "heldout" or not held.get("selection", {}).get("decided"):
        raise RecipeError(f"bench study: {path}: not a held-out phase's study.json with a decided selection")
    return held


def pick_rho(heldout_acc: dict[str, float], victims_acc: float) -> float:
    """Fine-mixing's rho rule (fixed before any Fine-mixing number of the MLM-trained PTM): of the
    grid (keys as `f"{rho:g}"`), the smallest rho whose held-out ACC is within ACC_BUDGET of the
    victims'; none within it: the most accurate (on a tie, the smaller rho)."""
    grid = sorted(float(k) for k in heldout_acc)
    within = [rho for rho in grid if heldout_acc[f"{rho:g}"] >= victims_acc - ACC_BUDGET]
    return within[0] if within else max(grid, key=lambda r: heldout_acc[f"{r:g}"])


def pattern(prefix: Path, n: int) -> str:
    """The brace pattern of shards PREFIX-000000.tar .. (n of them), as `recipe-dist shards` prints it."""
    from ..data.shards import brace_pattern

    return brace_pattern([f"{prefix}-{i:06d}.tar" for i in range(n)], str(prefix))


def comparisons(rows: dict) -> list[dict]:
    """Each named comparison a - b, paired by purification seed, for AASR and ACC. Against a
    one-model row (backdoored) its single value is held fixed: the interval then covers only the
    purifications' spread, not that row's own fine-tuning noise (marked `b_fixed`)."""
    out = []
    for a, b in COMPARISONS:
        if a not in rows or b not in rows:
            continue
        pa, pb = rows[a]["per_purification"], rows[b]["per_purification"]
        if len(pb) == 1:
            pb = pb * len(pa)
        else:  # paired by purification seed, whatever the rows' order
            by_seed = {p["purify_seed"]: p for p in pb}
            if set(by_seed) != {p["purify_seed"] for p in pa}:
                raise RecipeError(f"bench study: {a} and {b} were purified with other seeds; they cannot be paired")
            pb = [by_seed[p["purify_seed"]] for p in pa]
        for metric in ("aasr", "acc"):
            c = paired([p[metric] for p in pa], [p[metric] for p in pb])
            out.append({"a": a, "b": b, "metric": metric, **{k: c[k] for k in ("mean_diff", "ci95", "p", "n")},
                        "established": established(c), "b_fixed": len(rows[b]["per_purification"]) == 1})
    return out


def markdown(result: dict) -> str:
    lines = ["| row | ACC | AASR | MASR | purifications x fine-tunings |", "| --- | ---: | ---: | ---: | ---: |"]
    for rid, r in result["rows"].items():
        star = " **(recommended)**" if rid == result["recommended"] else ""
        lines.append(f"| {r['label']}{star} | {r['acc']:.2f} | {r['aasr']:.2f} | {r['masr']:.2f} | {r['n_purify']} x {r['n_finetune']} |")
    lines += ["", "| a - b | metric | mean | 95% CI | p | n | |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for c in result["comparisons"]:
        ci = f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]" if c["ci95"] else "n/a"
        p = f"{c['p']:.3f}" if c["p"] is not None else "n/a"
        fixed = " (b held fixed)" if c.get("b_fixed") else ""
        lines.append(f"| {c['a']} - {c['b']}{fixed} | {c['metric']} | {c['mean_diff']:+.2f} | {ci} | {p} | {c['n']} | "
                     f"{'established' if c['established'] else 'not established'} |")
    for rid, what in (("backdoored", "Attack gate (POR)"), ("adaptive_backdoored", "Adaptive POR")):
        probe = result["rows"].get(rid, {}).get("config", {}).get("probe")
        if probe:
            lines += ["", f"{what}: mean |pooler| of the backdoored PTM on triggered held-out sentences "
                          f"{probe['mean_pooler_abs']:.3f} (target >= 0.95), target-sign agreement {probe['mean_sign_agreement']:.1f}%."]
    sel = result.get("selection")
    if sel:
        lines += ["", f"Selection (held-out, pre-registered rule: {sel.get('rule', '-')}): "
                      + (f"**{sel['recommended']}**" if sel.get("decided") else f"not decided ({sel.get('why')})")]
        if sel.get("finemix"):
            fm = sel["finemix"]
            lines += ["", f"Fine-mixing's rho (rule: {fm['rule']}): **{fm['rho']:g}**; held-out ACC per rho "
                          + ", ".join(f"{k}: {v:.2f}" for k, v in fm["heldout_acc"].items()) + f"; victims {fm['victims_heldout_acc']:.2f}."]
    if result.get("frozen"):
        f = result["frozen"]
        lines += ["", f"Settings frozen in `{f['file']}` at commit {f['commit'][:10]} before test.tsv was read; "
                      f"selected: {f['selection'].get('recommended')}."]
    split = next(iter(result["rows"].values()))["split"]
    lines += ["", f"Split `{split}`; preset `{result['preset']}`; {result['date']}, {result['machine']}, commit {result['commit'][:10]}.",
              f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


# The side-by-side table of several attacks' studies (the README's headline): these rows, in this
# order, where a study has them; "selected" is the row its selection recommends, "twin" that
# row's lambda=0 twin.
HEADLINE_ROWS = ("clean", "backdoored", "selected", "twin", "reference", "reference_lambda0", "recommended", "recommended_lambda0",
                 "fp_gm", "finemix_epur", "adaptive_backdoored", "adaptive_reference", "adaptive_recommended")
HEADLINE_COMPARISONS = (("selected", "backdoored", "aasr"), ("selected", "twin", "aasr"), ("selected", "backdoored", "acc"),
                        ("selected", "fp_gm", "aasr"), ("selected", "fp_gm", "acc"), ("selected", "finemix_epur", "aasr"),
                        ("recommended", "reference", "aasr"))


def headline(results: list[dict]) -> str:
    """Several studies (one per attack) side by side: ACC and AASR of each row, then the named
    paired comparisons with their 95% CI and p; a row or comparison a study lacks shows "-"."""
    def resolve(result: dict, rid: str) -> str:
        rec = result["recommended"]
        return {"selected": rec, "twin": f"{rec}_lambda0"}.get(rid, rid)

    names = {"por": "POR", "badpre": "BadPre", "neuba": "NeuBA"}
    attacks = [names.get(a, a) for a in (r["rows"]["backdoored"]["config"]["attack"] for r in results)]
    # A row is shown once per study: "selected" and "twin" take the place of the rows they name
    # (a study that selected otherwise still shows its values in that later row).
    order: list[str] = []
    shown: list[set[str]] = [set() for _ in results]
    for rid in HEADLINE_ROWS:
        fresh = [resolve(r, rid) in r["rows"] and resolve(r, rid) not in seen for r, seen in zip(results, shown)]
        if any(fresh):
            order.append(rid)
            for r, seen in zip(results, shown):
                seen.add(resolve(r, rid))
    head = "| row | " + " | ".join(f"{a} ACC | {a} AASR" for a in attacks) + " | purifications x fine-tunings |"
    lines = [head, "| --- |" + " ---: | ---: |" * len(results) + " ---: |"]
    for rid in order:
        cells, label, shape = [], "", set()
        for r in results:
            row = r["rows"].get(resolve(r, rid))
            if row is None:
                cells += ["-", "-"]
                continue
            label = label or row["label"] + (" **(recommended)**" if rid == "selected" else "")
            cells += [f"{row['acc']:.2f}", f"{row['aasr']:.2f}"]
            shape.add(f"{row['n_purify']} x {row['n_finetune']}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(sorted(shape))} |")
    compared = ["", "| a - b | metric | " + " | ".join(f"{a}: mean [95% CI], p, n" for a in attacks) + " |",
                "| --- | --- |" + " --- |" * len(results)]
    for a, b, metric in HEADLINE_COMPARISONS:
        cells, fixed = [], False
        for r in results:
            ra, rb = resolve(r, a), resolve(r, b)
            c = next((c for c in r["comparisons"] if c["a"] == ra and c["b"] == rb and c["metric"] == metric), None)
            cells.append("-" if c is None or not c["ci95"] else
                         f"{c['mean_diff']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}], p {c['p']:.3f}, n {c['n']}: "
                         + ("established" if c["established"] else "not established"))
            fixed = fixed or bool(c and c.get("b_fixed"))
        if any(x != "-" for x in cells):  # a one-model b (backdoored): its own fine-tuning noise is not in the CI
            compared.append(f"| {a} - {b}{' (b held fixed)' if fixed else ''} | {metric} | " + " | ".join(cells) + " |")
    lines += compared if len(compared) > 3 else []
    lines.append("")
    for attack, r in zip(attacks, results):
        split = r["rows"]["backdoored"]["split"]
        frozen = r.get("frozen")
        lines.append(f"{attack}: split `{split}`" + (f", settings frozen in `{Path(frozen['file']).name}` at commit {frozen['commit'][:10]}"
                                                     if frozen else "") + f"; preset `{r['preset']}`; {r['date']}, {r['machine']}, commit {r['commit'][:10]}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench study", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    ap.add_argument("--output_dir", "--output-dir", default=None, help="default: runs/study-PRESET")
    ap.add_argument("--data", default="../shared/data", help="directory with sst2/, bookcorpus/ and wikitext2/ (minilm-mlm presets)")
    add_set_option(ap, "--set purify_seeds=1,2,3,4, --set eval.seeds=1,2,3")
    ap.add_argument("--render", nargs="+", default=None, metavar="STUDY_JSON",
                    help="print the tables of a study.json and exit; several (one per attack): side by side, as the README's headline")
    args = ap.parse_args(argv)
    if args.render:
        results = [json.loads(Path(f).read_text()) for f in args.render]
        print(markdown(results[0]) if len(results) == 1 else headline(results), end="")
        return 0
    study = Study(args.preset, set_keys(PRESETS[args.preset](), args.set), Path(args.output_dir or f"runs/study-{args.preset}"),
                  Path(args.data), "recipe-dist bench study " + " ".join(argv))
    print(markdown(study.run()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
