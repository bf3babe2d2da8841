"""`recipe-dist`: parse, build, run. Subcommands dispatch to their module; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from .errors import RecipeError


def _config_command(argv: list[str], prog: str, description: str, config_help: str, cls=None, extra: str = ""):
    """Parse `--config FILE` plus `--section.key=value` overrides into a typed config."""
    from .config import RunConfig, help_text, load_config

    cls = cls or RunConfig
    hidden = HIDDEN_SECTIONS.get(prog, ()) if cls is RunConfig else ()
    note = ("\n  --model.tiny.*: the embedded tiny model built when model.path is empty (see configs/tiny-bert.yaml)"
            if "model.tiny" in hidden else "")
    ap = argparse.ArgumentParser(
        prog=f"recipe-dist {prog}",
        description=description,
        epilog=f"config keys (override with --section.key=value{extra}):\n" + help_text(cls, hidden) + note,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help=config_help)
    args, rest = ap.parse_known_args(argv)
    return load_config(args.config, rest, cls=cls)


# RunConfig sections each command's --help leaves out: the other commands' own settings.
_OTHERS = ("attack", "prune", "finemix", "fit_head")
HIDDEN_SECTIONS = {
    "purify": (*_OTHERS[:3], "fit_head", "model.tiny"),
    "attack": ("prune", "finemix", "fit_head", "model.tiny"),
    "fit-head": ("attack", "prune", "finemix", "regularizer", "model.tiny"),
    "prune": ("attack", "finemix", "fit_head", "regularizer", "kernels", "model.tiny"),
    "finemix": ("attack", "prune", "fit_head", "regularizer", "kernels", "preempt", "checkpoint", "model.tiny"),
}


def build_job(command: str, cfg):
    """The job of `command` (purify, attack, fit-head, or any registered defense) for cfg.model.family."""
    from .models import get_family

    family = get_family(cfg.model.family)
    if command == "attack":
        from .attacks import get_attack

        return get_attack(cfg.attack.name, family)
    if command == "fit-head":
        from .head_fit import HeadFitJob

        return HeadFitJob(family)
    from .defenses import get_defense

    try:
        return get_defense(command, family)
    except KeyError:
        raise RecipeError(f"unknown job {command!r}") from None


def _run_job(command: str, cfg) -> tuple[object, dict]:
    """Build the command's job, train it, and (rank 0, after a finished run) write report.md."""
    from .trainer import Trainer

    trainer = Trainer(cfg, job=build_job(command, cfg))
    summary = trainer.train()
    if not summary.get("stopped") and not summary.get("already_finished") and int(os.environ.get("RANK", "0")) == 0:
        # After training, never inside the loop: ranks > 0 never import matplotlib. The curves
        # are read back from tb/, which the trainer has closed (flushed).
        from .report import write_report

        out = trainer.out
        write_report(out, title=f"recipe-dist {trainer.name}: {out.name}")
        figures = ", ".join(f"{k.removeprefix('final_')} {v:.4g}" for k, v in summary.items()
                            if k.startswith("final_") and isinstance(v, (int, float)))
        print(f"{trainer.name}: {summary.get('steps')} steps in {summary.get('wall_time_s', 0):.0f} s"
              f"{'; last logged ' + figures if figures else ''}; wrote {out / 'model'} and {out / 'report.md'}")
        if command in ("purify", "attack"):
            import shlex

            # The next step of the README's workflow, runnable as printed once the task files exist.
            base = f" --baseline {shlex.quote(str(trainer.model_dir))}" if command == "purify" and cfg.model.path else ""
            print(f"next: recipe-dist evaluate --config configs/eval/sst2.yaml --model.path {shlex.quote(str(out / 'model'))}{base} "
                  f"--task.train_file TRAIN.tsv --task.test_file TEST.tsv --output_dir {shlex.quote(str(out) + '-eval')}")
    return trainer, summary


def _purify(argv: list[str]) -> int:
    cfg = _config_command(argv, "purify", "RECIPE purification: continual pre-training with lam * sum ||W||_F on DeepSpeed.",
                          "YAML run config (configs/*.yaml)")
    _run_job("purify", cfg)
    return 0


def _attack(argv: list[str]) -> int:
    cfg = _config_command(argv, "attack", "Build a backdoored PTM (POR, NeuBA or BadPre; NeuBA-vision for vit, vgg, clip) on the same engine as purify; writes the model in its family's format (an HF directory with its pooler for encoders).",
                          "YAML run config (configs/attack/*.yaml)")
    _run_job("attack", cfg)
    return 0


def _defense(command: str, description: str):
    """A defense that runs on its own rather than through the Trainer (defenses/: `run(cfg)`)."""

    def run(argv: list[str]) -> int:
        cfg = _config_command(argv, command, description, "YAML run config (configs/*.yaml)")
        from .defenses import get_defense
        from .models import get_family

        get_defense(command, get_family(cfg.model.family)).run(cfg)
        return 0

    return run


_prune = _defense("prune", "Fine-pruning (method.md section 4): rank the family's neurons by mean first-token activation on "
                  "the auxiliary shards (any number of ranks, ZeRO-3 included) and zero the lowest: --prune.variant fp, fp-gm or fp-ga. "
                  "Writes OUTPUT_DIR/model (loads like the input), prune.json and report.md.")
_finemix = _defense("finemix", "Fine-mixing with E-PUR (method.md section 4) on a backdoored fine-tuned classifier "
                    "(--model.path): mix its weights with --finemix.pretrained, reset drifted embeddings, fine-tune on "
                    "--finemix.train_file. Writes OUTPUT_DIR/model and finemix.json.")


def _dynamics(argv: list[str]) -> int:
    from .dynamics import main

    return main(argv)


def _analyze(argv: list[str]) -> int:
    from .analysis import main

    return main(argv)


def _fit_head(argv: list[str]) -> int:
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--eval-samples", "--eval_samples", type=int, default=512)
    known, rest = ap.parse_known_args(argv)
    cfg = _config_command(rest, "fit-head", "Fit the masked-LM head of an encoder that ships without one (e.g. a sentence-transformers "
                          "export): only the head transform, its LayerNorm and the decoder bias train, the encoder is frozen and the "
                          "decoder stays tied to the word embeddings; --fit_head.scope=all then trains encoder and head together "
                          "(continued masked-LM pre-training). Writes a complete *ForMaskedLM directory to OUTPUT_DIR/model.",
                          "YAML run config (configs/fit-head-bert.yaml)", extra="; --eval-samples N scores the first N auxiliary samples before/after")
    from .head_fit import masked_lm_metrics

    trainer, summary = _run_job("fit-head", cfg)
    if summary.get("stopped") or int(os.environ.get("RANK", "0")) != 0:
        return 0
    family = trainer.job.family
    out = Path(cfg.output_dir)
    if summary.get("already_finished") and (out / "fit_head.json").is_file():
        return 0  # scored when it finished; a resume of a finished run changes nothing
    if cfg.fit_head.eval_urls:
        from .data.pipeline import shard_urls

        urls, where = shard_urls(cfg.fit_head.eval_urls), "fit_head.eval_urls (held out from training)"
    else:
        urls, where = trainer.urls, "data.train_urls (also seen in training)"
    before = masked_lm_metrics(trainer.model_dir, family, cfg, urls, known.eval_samples)
    after = masked_lm_metrics(out / "model", family, cfg, urls, known.eval_samples)
    report = {"input": str(trainer.model_dir), "output": str(out / "model"), "scope": cfg.fit_head.scope,
              "scored_on": f"the first {before['samples']} samples of {where}, static masks",
              "before": before, "after": after}
    (out / "fit_head.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"fit-head: masked-LM loss {before['loss']:.4f} -> {after['loss']:.4f}, accuracy {before['accuracy']:.2f}% -> "
          f"{after['accuracy']:.2f}% on {before['masked_positions']} masked positions; wrote {out / 'model'}")
    return 0


def _evaluate(argv: list[str]) -> int:
    from .evaluation.finetune import EvalConfig, evaluate

    cfg = _config_command(
        argv,
        "evaluate",
        "Backdoor evaluation (method.md section 3): fine-tune a copy of the model on a clean task, "
        "then ACC, ASR per (trigger, label), AASR and MASR; writes OUTPUT_DIR/eval.json and eval.md.",
        "YAML evaluation config (configs/eval/*.yaml)",
        cls=EvalConfig,
        extra="; --seeds 1,2,3 averages several fine-tunings",
    )
    report = evaluate(cfg)
    checked = [("", report)] + ([("baseline ", _baseline_report(report))] if "baseline" in report else [])
    for which, r in checked:
        for seed, why in r.get("invalid_seeds", {}).items():
            print(f"recipe-dist: warning: INVALID {which}evaluation, seed {seed}: {why}; its ASR is not evidence either way "
                  "(more fine-tuning epochs, another lr, or a larger training set)", file=sys.stderr)
    line = f"ACC {report['acc']:.2f}  AASR {report['aasr']:.2f}  MASR {report['masr']:.2f}"
    if "difference" in report:
        d = report["difference"]
        line += f"  (vs baseline: ACC {d['acc']:+.2f}  AASR {d['aasr']:+.2f}  MASR {d['masr']:+.2f})"
    print(f"{line}{'  INVALID' if not report['valid'] else ''}  -> {cfg.output_dir}/eval.json, eval.md")
    return 0


def _baseline_report(report: dict) -> dict:
    """The baseline's own eval.json (written beside, under baseline/)."""
    try:
        return json.loads((Path(report["baseline"]["dir"]) / "eval.json").read_text())
    except (OSError, ValueError):
        return {}


def _shards(argv: list[str]) -> int:
    from .data import shards

    ap = argparse.ArgumentParser(prog="recipe-dist shards", description="Turn TSV/TXT/JSONL text, an image folder or an image-caption "
                                 "CSV into WebDataset tar shards with a manifest (per shard: samples, bytes, sha256), or write the "
                                 "manifest of existing shards.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", help="a .tsv (with header), .jsonl or .txt file (local path or URL)")
    src.add_argument("--image-folder", metavar="DIR", help="one subfolder per class (sorted names are classes 0..K-1): jpg/png + cls "
                     "samples, as timm's ImageFolder")
    src.add_argument("--captions", metavar="CSV", help="a CSV of image paths and captions (open_clip's --csv-img-key/--csv-caption-key "
                     "columns, default filepath and title; paths relative to the CSV): jpg/png + txt samples")
    ap.add_argument("--image-column", default="filepath", help="--captions: image path column")
    ap.add_argument("--caption-column", default="title", help="--captions: caption column")
    ap.add_argument("--output", help="shard prefix; shards are PREFIX-000000.tar, ... and manifest.json beside them")
    ap.add_argument("--manifest-only", metavar="URLS", default=None,
                    help="write manifest.json for existing shards (brace pattern, prefix/ or glob), streaming each once")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--text-column", default=None, help="text column/key (default: text, sentence, ...)")
    ap.add_argument("--label-column", default=None, help="label column/key, stored as 'cls' (default: label if present)")
    ap.add_argument("--wikitext", action="store_true", help="--input is WikiText's tokenized release (.txt): running text in "
                    "--chunk-words chunks, headings dropped, ' @-@ ' joins undone")
    ap.add_argument("--chunk-words", type=int, default=None, help="--wikitext: words per sample (default 64, as the POR reference)")
    ap.add_argument("--unk", default="drop", choices=["drop", "[UNK]"], help="--wikitext: drop <unk> words or keep them as [UNK]")
    ap.add_argument("--overwrite", action="store_true", help="replace shards that already exist under --output (default: refuse)")
    ap.add_argument("--max-sample-bytes", type=int, default=1 << 20,
                    help="refuse a sample whose text is larger (default 1 MiB): one runaway line would otherwise become one "
                         "training sample that the tokenizer and every rank's memory must hold")
    return shards.main(ap.parse_args(argv))


def _report(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from .report import write_report

    ap = argparse.ArgumentParser(prog="recipe-dist report",
                                 description="Write RUN_DIR/report.md and its plots from the run's TensorBoard files.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a purify or attack output_dir")
    ap.add_argument("--eval", action="append", default=[], metavar="NAME=PATH",
                    help="an evaluation to tabulate and plot, e.g. purified=runs/eval/eval.json (repeatable)")
    ap.add_argument("--title", default=None, help="report title (default: 'Run report: <dir name>')")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RecipeError(f"RUN_DIR: no such directory: {run_dir}")
    evals = {}
    for spec in args.eval:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RecipeError(f"--eval: expected NAME=PATH, got {spec!r}")
        try:
            evals[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError(f"--eval {name}: cannot read {path}: {e}") from None
    print(write_report(run_dir, evals, title=args.title))
    return 0


def _slurm(argv: list[str]) -> int:
    from . import slurm

    if argv[:1] == ["run-task"]:  # an array task: the task file's command line, run by this CLI
        return main(slurm.task_argv(argv[1:]))
    return slurm.main(argv)


COMMANDS = {"prune": _prune, "finemix": _finemix, "analyze": _analyze, "dynamics": _dynamics, "slurm": _slurm, "purify": _purify, "attack": _attack, "fit-head": _fit_head, "shards": _shards, "evaluate": _evaluate, "report": _report}

# `recipe-dist --help`: each command in one line, in the order a user meets them.
SUMMARIES = {
    "shards": "pack text, images or image-caption pairs into WebDataset shards (+ manifest)",
    "fit-head": "fit the masked-LM head an encoder ships without (or continue MLM training)",
    "purify": "RECIPE: continual pre-training with lambda * sum ||W||_F, on DeepSpeed",
    "evaluate": "fine-tune on a clean task and score ACC, ASR, AASR, MASR (--baseline to compare)",
    "report": "a run's loss and weight-norm curves, with before/after evaluation tables",
    "slurm": "submit purify/attack/fit-head to SLURM (one job or a manifest array) and follow them",
    "attack": "build a backdoored PTM (POR, NeuBA, BadPre, NeuBA-vision) for study",
    "prune": "baselines: fine-pruning (FP, FP-GM, FP-GA) by neuron activations",
    "finemix": "baseline: Fine-mixing (and E-PUR) of a fine-tuned model with its clean base",
    "analyze": "neuron analysis: poison-only and overlapping FFN neurons before/after",
    "dynamics": "score every checkpoint of a purify run (ASR over training)",
}


def _usage(plugins: dict) -> str:
    width = max(map(len, [*COMMANDS, *plugins]))
    lines = ["usage: recipe-dist COMMAND [options]    (recipe-dist COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {SUMMARIES.get(name, '')}" for name in SUMMARIES]
    lines += [f"  {name:<{width}}  {'(the lab: ' + name + ' --help)'}" for name in plugins]
    return "\n".join(lines)


def plugin_commands() -> dict:
    """Commands other packages add under the entry-point group `recipe_dist.commands` (each a
    callable taking argv and returning an exit code). The lab (`recipe_dist.lab`: demo, bench)
    plugs in this way, so the product never imports it."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="recipe_dist.commands") if ep.name not in COMMANDS}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in {**COMMANDS, **plugins}:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(_usage(plugins), file=sys.stdout if asked else sys.stderr)
        if argv and not asked:
            print(f"recipe-dist: error: unknown command '{argv[0]}'", file=sys.stderr)
        return 0 if asked else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        command = COMMANDS.get(argv[0]) or plugins[argv[0]].load()
        return command(argv[1:])
    except RecipeError as e:
        _error_line(str(e))
        return 2
    except KeyboardInterrupt:
        # Ctrl-C (SIGINT to every rank of the process group): no traceback, one line from rank 0.
        # A checkpoint being written is removed (checkpoint.save), so only complete ones remain.
        if os.environ.get("RANK", "0") == "0":
            _error_line("interrupted; nothing partial was kept: continue from the last complete checkpoint with --resume auto")
        return 130


def _quiet_libraries() -> None:
    """Silence, at their source, library messages that are never about the user's input:
    - DeepSpeed's "Setting accelerator to CPU" warning (each rank, each start): on a machine
      without CUDA the CPU accelerator is the only choice, so it is named explicitly;
    - torch's "No CUDA runtime is found, using CUDA_HOME" (logged when DeepSpeed imports the
      extension builder on a CPU machine; the op it builds is the CPU one);
    - transformers' per-load "Loading weights" progress bars (a load takes well under a second
      here; the load report itself is cut to one line by models/load_report.py).
    Warnings about the user's own model or data are left alone."""
    import logging

    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _error_line(message: str) -> None:
    """The one-line error, written in a single write so ranks sharing stderr never splice lines.

    A progress bar (or, with several ranks, another rank's output) may be mid-line on the same
    stream; then the error starts on a fresh line.
    """
    from tqdm import tqdm

    fresh = bool(getattr(tqdm, "_instances", None)) or int(os.environ.get("WORLD_SIZE", "1")) > 1
    line = ("\n" if fresh else "") + f"recipe-dist: error: {message}\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (AttributeError, OSError, ValueError):  # stderr replaced by a non-file (e.g. captured in tests)
        sys.stderr.write(line)
        sys.stderr.flush()


def run() -> NoReturn:
    """The process entry (the `recipe-dist` script, `python -m recipe_dist`): `main`, then `end_process`."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    except BaseException:  # a bug: the traceback Python would print, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    end_process(code)


def end_process(code) -> NoReturn:
    """sys.exit(code), minus the interpreter's teardown, which can abort a run that has finished.

    gloo's worker threads outlive destroy_process_group (gloo's shutdown does not stop them; a
    finished 2-rank run still has four at exit) and may still be releasing the last collective's
    tensors when the main thread returns. A thread that needs the GIL once the interpreter is
    finalizing is ended by CPython (pthread_exit) inside torch's noexcept code, and the C++
    runtime aborts the process: "terminate called without an active exception", exit -6, after a
    run that had written everything (CI: rank 1 of a 2-rank run, and torchrun then killed rank 0
    before its summary line; tests/test_core.py reproduces it with a thread inside a matmul).
    Exit handlers (atexit: multiprocessing's cleanup of worker processes, logging's flush) still
    run while every thread can take the GIL; then the streams are flushed and the process ends
    without the teardown that races those threads. Files are closed where they are written."""
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, exit 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():  # as Python does first: wait for the non-daemon threads
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # then what Py_Finalize runs while the interpreter is whole
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code & 0xFF)  # sys.exit's truncation: -1 is 255


if __name__ == "__main__":
    run()
