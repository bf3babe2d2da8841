"""The defense table's rows (method.md sections 1-4): each row id names its stage once, here.

Rows: the clean PTM; the backdoored PTM with no defense; RECIPE at lambda = 1 (pooler kept, and
with the pooler reset as the reference code's export does); only L_PT (lambda = 0); only the
regularizer (pt_weight = 0); pooler reset only; the lambda sweep; RECIPE on the clean PTM;
Fine-pruning FP / FP-GM / FP-GA; Fine-mixing with and without E-PUR; and, once `--search` has
selected a setting, that setting (recipe_selected), its lambda=0 twin and it on the clean PTM.
A new row is one builder here plus one ROW_IDS / ROW_LABELS entry.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ...config import ConfigError
from .bench import DefenseBench, drop_pooler, git_commit, search_file, search_stage
from .diagnostics import neuron_table
from .recipes import SEARCH_STAGES
from .render import markdown

# Row ids in the order of value: what shows purification first, the sweeps last.
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
DOWNSTREAM = {"finemix", "finemix_epur"}  # built per seed by DefenseBench.finemix, not by a builder


def builders(b: DefenseBench, ptm: Path, backdoored: Path, aux: str) -> dict:
    """Row id -> a function returning (model dir, row config)."""
    r = b.r

    def purify(name: str, model: Path, lam: float, pt_weight: float = 1.0, small: bool = False):
        if small:
            return b.small_row(name, model, aux, lam, pt_weight)
        from .recipes import purification

        return b.purify(name, model, aux, purification(r, lam, pt_weight))

    def reset(name: str, model: Path) -> Path:
        target = b.out / name / "model"
        if not (target / "model.safetensors").is_file():
            drop_pooler(model, target)
        return target

    def prune(variant: str):
        cfg = copy.deepcopy(b.r.prune)
        cfg.prune.variant = variant
        model_dir = b.run_job("prune", f"prune-{variant}", backdoored, aux, cfg)
        report = json.loads((model_dir.parent / "prune.json").read_text())
        return model_dir, {"defense": variant, **{k: report[k] for k in ("layers_worth", "pruned", "pruned_per_layer", "samples")}}

    attack = r.attack
    small = bool(r.small_setting)
    rows = {
        "clean": lambda: (ptm, {"model": "the PTM" + (" with its fitted MLM head" if r.fit_head_first else "")}),
        "backdoored": lambda: (backdoored, {"attack": attack.attack.name, "attack_steps": attack.train.max_steps, "attack_lr": attack.optim.lr}),
        "pooler_reset": lambda: (reset("pooler-reset", backdoored), {"defense": "backdoored weights without pooler.*"}),
        "recipe": lambda: purify(SEARCH_STAGES["recipe"], backdoored, 1.0),
        "recipe_pooler_reset": lambda: (lambda m, c: (reset(SEARCH_STAGES["recipe"] + "-pooler-reset", m), {**c, "pooler": "reset"}))(
            *purify(SEARCH_STAGES["recipe"], backdoored, 1.0)),
        "lambda0": lambda: purify(SEARCH_STAGES["lambda0"], backdoored, 0.0),
        "reg_only": lambda: purify("purify-regonly", backdoored, 1.0, pt_weight=0.0, small=small),
        "recipe_on_clean": lambda: purify("purify-clean", ptm, 1.0, small=small),
        "recipe_selected": lambda: b.selected(backdoored, aux),
        "lambda0_selected": lambda: b.selected(backdoored, aux, lam=0.0),
        "recipe_on_clean_selected": lambda: b.selected(ptm, aux, stage_prefix="purify-clean-"),
        "fp": lambda: prune("fp"), "fp_gm": lambda: prune("fp-gm"), "fp_ga": lambda: prune("fp-ga"),
    }
    if small:  # the small setting's lambda=0 twin, and at lambda 1 the search candidate itself (its stage, not a second run)
        rows["lambda0_small"] = lambda: purify("purify-lam0-small", backdoored, 0.0, small=True)
        rows["lambda1_small"] = lambda: purify(search_stage(r.small_setting), backdoored, 1.0, small=True)
    for lam in r.lambdas:
        rows[f"lambda{lam:g}"] = lambda lam=lam: purify(f"purify-lam{lam:g}", backdoored, lam, small=small)
    return rows


def wanted(b: DefenseBench, known: dict, only: list[str] | None) -> list[str]:
    """The rows to build now, in ROW_IDS order; the *_selected rows once --search has selected a setting."""
    unknown = sorted(set(only or []) - set(known) - DOWNSTREAM)
    if unknown:
        raise ConfigError(f"--rows: unknown row id(s) {', '.join(unknown)} (known: {', '.join(r for r in ROW_IDS if r in known or r in DOWNSTREAM)})")
    record = search_file(b.out, [1])
    searched = record.is_file() and json.loads(record.read_text()).get("selected")
    return [r for r in ROW_IDS if (r in known or r in DOWNSTREAM) and (r in (only or []) or not only and (not r.endswith("_selected") or searched))]


def run(b: DefenseBench, only: list[str] | None = None) -> dict:
    """Build, score and write the rows; rows already in bench.json (an earlier, partial run) are
    kept, and each row is written before the next starts, so an interruption loses no finished row."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    b.out.mkdir(parents=True, exist_ok=True)
    ptm, aux, train, test = b.prepare()
    meta = {"model": str(ptm), "auxiliary": aux or "SYNTHETIC corpus", "task": {"train": str(train), "test": str(test)}}
    if b.r.fit_head_first:
        ptm = b.run_job("fit-head", "fit-head", ptm, aux, b.r.fit_head)
        meta["fit_head"] = json.loads((ptm.parent / "fit_head.json").read_text()) if (ptm.parent / "fit_head.json").is_file() else None
    backdoored = b.run_job("attack", b.attack_stage, ptm, aux, b.r.attack)
    known = builders(b, ptm, backdoored, aux)
    previous = b.out / "bench.json"
    rows = json.loads(previous.read_text())["rows"] if previous.is_file() else {}
    for rid in wanted(b, known, only):
        if rid in DOWNSTREAM:
            r, config = b.finemix(rid, backdoored, ptm, train, test, epur=rid == "finemix_epur")
        else:
            model, config = known[rid]()
            r = b.evaluate(rid, model, train, test)
        rows[rid] = row(rid, r, {**config, "commit": git_commit()[:10]})  # rows of one table may come from several runs
        rows = {k: rows[k] for k in ROW_IDS if k in rows}
        b.write(rows, meta)
    meta["neurons"] = neuron_table(b, backdoored, b.out / SEARCH_STAGES["recipe"] / "model", test)
    result = b.write(rows, meta)
    print(markdown(result))
    return result


def row(rid: str, r: dict, config: dict) -> dict:
    keys = ("acc", "aasr", "masr")
    return {"label": ROW_LABELS[rid], **{m: r[m] for m in keys}, "per_seed": {m: [s[m] for s in r["per_seed"]] for m in keys},
            "std": {m: r["std"][m] for m in keys}, "asr_per_trigger": r["asr_per_trigger"], "seeds": r["seeds"], "config": config}
