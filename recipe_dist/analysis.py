"""`recipe-dist analyze`: which neurons a trigger switches on (method.md section 5, paper Table 10).

For each model, the family's neuron sites are read at the first token on clean sentences and on
the same sentences with each trigger inserted. A neuron counts as activated by a set when it is
> 0 on more than `--threshold` of it. Reported per trigger and layer: the overlap ratio
|clean ∩ poisoned| / |poisoned| and the poison-only neurons (activated by poisoned, not clean).
`--after NAME=PATH` adds models to compare (e.g. the purified one): the table's before/after.
Writes OUTPUT_DIR/analysis.json and poison_only.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .errors import RecipeError


def analyze_model(path: Path, family, cfg, clean: list[str], triggers: list[str], insertions: int, threshold: float, batch: int = 64) -> dict:
    from .triggers import insert_trigger
    from .neurons import overlap, record

    loaded = family.load(path, cfg)

    def stats(texts: list[str]):
        batches = (family.feature_inputs(loaded.processor, texts[i : i + batch], cfg) for i in range(0, len(texts), batch))
        return record(loaded.model, family, batches, fused=cfg.kernels.fused)

    base = stats(clean)
    per_trigger = {}
    for t in triggers:
        poisoned = [insert_trigger(s, t, 0, i, times=insertions) for i, s in enumerate(clean)]
        per_trigger[t] = overlap(base, stats(poisoned), threshold)
    return {
        "path": str(path),
        "per_trigger": per_trigger,
        "mean_overlap_ratio": statistics.fmean(r["overlap_ratio"] for r in per_trigger.values()),
        "mean_poison_only": statistics.fmean(r["poison_only"] for r in per_trigger.values()),
    }


def plot(result: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    first = next(iter(result["models"].values()))
    layers = [row["layer"] for row in next(iter(first["per_trigger"].values()))["layers"]]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(layers), 3.2))
    for k, name in enumerate(names):
        per = result["models"][name]["per_trigger"].values()
        means = [statistics.fmean(r["layers"][i]["poison_only"] for r in per) for i in range(len(layers))]
        ax.bar([i + k * width for i in range(len(layers))], means, width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(layers))], [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("poison-only neurons (mean over triggers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    from .config import RunConfig
    from .data.shards import read_records
    from .models import get_family

    ap = argparse.ArgumentParser(prog="recipe-dist analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model.path", dest="model_path", required=True, help="the model to analyse (e.g. the backdoored PTM)")
    ap.add_argument("--model.family", dest="family", default="bert")
    ap.add_argument("--name", default="before", help="its name in the report (default: before)")
    ap.add_argument("--after", action="append", default=[], metavar="NAME=PATH", help="another model to compare, e.g. recipe=runs/purify/model (repeatable)")
    ap.add_argument("--clean", required=True, help="clean sentences: .tsv (with header), .csv, .jsonl or .txt")
    ap.add_argument("--text-column", default="sentence")
    ap.add_argument("--triggers", default="cf,mn,bb,tq,mb", help="comma-separated trigger words")
    ap.add_argument("--insertions", type=int, default=1, help="times each trigger is inserted per sentence")
    ap.add_argument("--threshold", type=float, default=0.5, help="activated: > 0 on more than this share of a set's samples")
    ap.add_argument("--max-samples", type=int, default=1000, help="first N clean sentences (0: all)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--output_dir", "--output-dir", required=True)
    args = ap.parse_args(argv)
    if args.insertions < 1:
        raise RecipeError(f"--insertions: must be >= 1 (times each trigger is inserted), got {args.insertions}")
    if not 0 <= args.threshold < 1:
        raise RecipeError(f"--threshold: must be in [0, 1), got {args.threshold}")
    models = {args.name: Path(args.model_path)}
    for spec in args.after:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RecipeError(f"--after: expected NAME=PATH, got {spec!r}")
        models[name] = Path(path)
    if not Path(args.clean).is_file():
        raise RecipeError(f"--clean: file not found: {args.clean}")
    texts = [rec["text"] for rec in read_records(args.clean, args.text_column, None)]
    texts = texts[: args.max_samples] if args.max_samples else texts
    cfg = RunConfig()
    cfg.model.family, cfg.data.max_length = args.family, args.max_length
    family = get_family(args.family)
    triggers = [t for t in args.triggers.split(",") if t]
    result = {"clean": args.clean, "samples": len(texts), "triggers": triggers, "insertions": args.insertions, "threshold": args.threshold,
              "models": {name: analyze_model(path, family, cfg, texts, triggers, args.insertions, args.threshold) for name, path in models.items()}}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "poison_only.png")
    for name, r in result["models"].items():
        print(f"analyze {name}: overlap ratio {r['mean_overlap_ratio']:.3f}, poison-only neurons {r['mean_poison_only']:.1f} "
              f"(mean over {len(triggers)} triggers)")
    print(f"wrote {out / 'analysis.json'} and {out / 'poison_only.png'}")
    return 0
