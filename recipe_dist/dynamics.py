"""`recipe-dist dynamics`: ACC and MASR along a purification (paper section 5.2, "purification dynamics").

Every complete checkpoint of a purify run (keep them: `--checkpoint.keep` at least the number
of saves) is turned back into a model directory of the run's family, with the weights DeepSpeed
saved (ZeRO-0: the module state; ZeRO 1-3: the fp32 master weights, consolidated by DeepSpeed's
own zero_to_fp32), all read with `weights_only` unpickling. Each, and the run's input model as
step 0, is scored by `evaluate` with the given evaluation config; dynamics.json and dynamics.png
hold ACC and MASR (and AASR) against the step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .errors import RecipeError


def _strip_to(keys: set[str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each key's leading wrapper names ("loss.model.", "module.") dropped until it is one of `keys`."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        for i in range(len(parts)):
            name = ".".join(parts[i:])
            if name in keys:
                out[name] = v
                break
    return out


def checkpoint_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the trained task module saved in DeepSpeed checkpoint `ckpt_dir`."""
    from .checkpoint import read_meta, weights_only_loads

    meta = read_meta(ckpt_dir) or {}
    with weights_only_loads():
        if meta.get("zero_stage", 0) == 0:
            files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise RecipeError(f"dynamics: no model states in {ckpt_dir}")
            return torch.load(files[0], map_location="cpu")["module"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)


def export_checkpoint(run_dir: Path, tag: str, family, cfg, target: Path) -> Path:
    """The checkpoint `tag` of `run_dir` as a model directory of the family (like the run's own export).

    An export already in `target` is reused only when its source.json names this very checkpoint
    (run directory, run id and the checkpoint's own record digest): an output directory reused for
    another run, or a checkpoint rewritten since, is exported again, never read stale."""
    from .checkpoint import read_meta
    from .rundir import write_dir_aside

    meta = read_meta(run_dir / "checkpoints" / tag) or {}
    source = {"run_dir": str(run_dir.resolve()), "run_id": meta.get("run_id"), "checkpoint": tag,
              "record_sha256": meta.get("record_sha256")}
    record = target.with_name(target.name + ".source.json")
    try:
        if (target / "config.json").is_file() and json.loads(record.read_text()) == source:
            return target
    except (OSError, ValueError):
        pass
    loaded = family.load(_input_model(run_dir, cfg), cfg)
    model_state = loaded.model.state_dict(keep_vars=True)
    saved = _strip_to(set(model_state), checkpoint_state(run_dir / "checkpoints" / tag))
    # Parameters the run kept frozen are not all in ZeRO's fp32 partitions: the input's values are
    # theirs. Names of one tied tensor share one value, so the export writes the tie as the run did.
    shared: dict[int, torch.Tensor] = {}
    state = {k: shared.setdefault(id(v), saved.get(k, v.detach()).detach().clone()) for k, v in model_state.items()}
    record.unlink(missing_ok=True)
    write_dir_aside(target, lambda d: family.export(loaded, state, d))
    record.write_text(json.dumps(source) + "\n")  # last: names a complete export
    return target


def _input_model(run_dir: Path, cfg) -> Path:
    return Path(cfg.model.path) if cfg.model.path else run_dir / "input_model"


def main(argv: list[str]) -> int:
    from .config import apply_dict, load_config
    from .evaluation.finetune import EvalConfig, evaluate
    from .checkpoint import verified_tags
    from .models import get_family

    ap = argparse.ArgumentParser(prog="recipe-dist dynamics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any key of the evaluation config is an option too, e.g. --task.train_file PATH "
                                        "--task.test_file PATH --seeds 1,2 (recipe-dist evaluate --help lists them).")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a purify output_dir with its checkpoints")
    ap.add_argument("--config", required=True, help="evaluation config (configs/eval/*.yaml); its output_dir is replaced")
    ap.add_argument("--output_dir", "--output-dir", required=True)
    args, rest = ap.parse_known_args(argv)
    run_dir, out = Path(args.run_dir), Path(args.output_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RecipeError(f"RUN_DIR: {run_dir} has no config.yaml (not a purify run directory)")
    run_cfg = load_config(str(run_dir / "config.yaml"), [])
    run_id = (run_dir / "RUN_ID").read_text().strip() if (run_dir / "RUN_ID").is_file() else ""
    tags = sorted(verified_tags(run_dir / "checkpoints", run_id))  # a damaged checkpoint is named and skipped
    if not tags:
        raise RecipeError(f"dynamics: no complete checkpoint in {run_dir / 'checkpoints'} (run purify with --checkpoint.keep large enough)")
    family = get_family(run_cfg.model.family)
    # model.path and output_dir are set per point below; placeholders satisfy the config's checks.
    eval_cfg = load_config(args.config, [*rest, f"--model.path={run_dir}", f"--output_dir={out}"], cls=EvalConfig)
    points = [(0, _input_model(run_dir, run_cfg))] + [
        (step, export_checkpoint(run_dir, tag, family, run_cfg, out / tag / "model")) for step, tag in tags]
    series = []
    for step, model in points:
        apply_dict(eval_cfg, {"output_dir": str(out / f"eval-step{step:08d}"), "model": {"path": str(model), "family": run_cfg.model.family}})
        eval_cfg.validate()
        r = evaluate(eval_cfg)
        series.append({"step": step, "model": str(model), "acc": r["acc"], "aasr": r["aasr"], "masr": r["masr"]})
        print(f"dynamics: step {step}: ACC {r['acc']:.2f}  AASR {r['aasr']:.2f}  MASR {r['masr']:.2f}", flush=True)
    (out / "dynamics.json").write_text(json.dumps({"run": str(run_dir), "points": series}, indent=2) + "\n")
    _plot(series, out / "dynamics.png", run_dir.name)
    print(f"wrote {out / 'dynamics.json'} and {out / 'dynamics.png'}")
    return 0


def _plot(series: list[dict], target: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in series]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, style in (("acc", "-o"), ("masr", "-s"), ("aasr", "--^")):
        ax.plot(steps, [p[key] for p in series], style, label=key.upper())
    ax.set_xlabel("purification step")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(f"purification dynamics: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
