"""The lab's commands, `recipe-dist demo` and `recipe-dist bench ...`. They reach the product's
CLI through the entry-point group `recipe_dist.commands` (pyproject.toml), so the library never
imports the lab; the lab uses the library like any other program would."""

from __future__ import annotations

import argparse
import sys


def demo(argv: list[str]) -> int:
    from .demo import PRESETS, run_demo
    from .stages import add_set_option

    ap = argparse.ArgumentParser(
        prog="recipe-dist demo",
        description="The whole story on CPU, no downloads: build a tiny SYNTHETIC BERT PTM, backdoor it with POR, "
        "evaluate, purify it with RECIPE through `purify`, evaluate again; prints one table, writes demo.json and report.md.",
    )
    ap.add_argument("--output_dir", "--output-dir", default="runs/demo", help="where every stage's run directory goes (default: runs/demo)")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS), help="stage sizes; smoke only checks the wiring")
    add_set_option(ap, "--set purify.regularizer.lam=0.5, --set eval.seeds=1")
    args = ap.parse_args(argv)
    run_demo(args.output_dir, args.preset, args.set)
    return 0


def bench(argv: list[str]) -> int:
    benches = {"decoder": "recipe_dist.lab.decoder", "defense": "recipe_dist.lab.defense", "loader": "recipe_dist.lab.loader", "memory": "recipe_dist.lab.memory", "step": "recipe_dist.lab.step", "study": "recipe_dist.lab.study", "vision": "recipe_dist.lab.vision"}
    if not argv or argv[0] not in benches:
        print(f"usage: recipe-dist bench {{{','.join(benches)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(benches[argv[0]]).main(argv[1:])
