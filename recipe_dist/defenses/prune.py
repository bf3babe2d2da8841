"""Fine-pruning adapted to PTMs (method.md section 4): FP, FP-GM and FP-GA.

Only the pruning half of Fine-pruning, so no labels: the auxiliary shards are streamed through
the model on every rank, the family's neuron sites are read at the first token
(`neurons.ActivationRecorder`, all-reduced over ranks; under ZeRO-3 through the engine's
forward), neurons are ranked by mean activation, lowest first, and the chosen ones are zeroed:
their weight row (column for GPT-2's Conv1D) and bias entry. The output is the family's own
export, loading exactly like the input; prune.json and report.md list the neurons pruned per layer.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch

from ..config import ConfigError, deepspeed_config, fit_batch_to_world
from ..data.train_data import TrainData
from ..distributed import barrier, process_group, run_on_main
from ..jobs import FamilyJob
from ..models.base import carry_input_files, sha256_files
from ..neurons import apply_pruning, prune_selection, record
from ..rundir import RunDir, write_dir_aside, write_run_config, write_summary
from . import register_defense


class _FeatureJob(FamilyJob):
    """Raw texts in, unmasked model inputs out: what neuron statistics read. Image families
    preprocess with their evaluation transform (no augmentation)."""

    def preprocess(self, processor, cfg):
        if self.family.modality != "text":
            return self.family.preprocess(processor, cfg, train=False)
        return lambda sample: sample

    def collate(self, processor, cfg):
        family = self.family
        if family.modality != "text":
            return family.collate(processor, cfg)
        return lambda features, _seed: family.feature_inputs(processor, [f["text"] for f in features], cfg)


def neuron_statistics(family, loaded, cfg, dist_info, out: Path, max_samples: int = 0):
    """The family's neuron statistics of `loaded.model` over one pass of data.train_urls on every rank."""
    import deepspeed

    note = fit_batch_to_world(cfg, dist_info.world_size)
    if note and dist_info.is_main:
        print(note, flush=True)
    data = TrainData(cfg, dist_info, _FeatureJob(family), loaded.processor, out,
                     deepspeed_config(cfg, dist_info.world_size)["gradient_accumulation_steps"])
    model = loaded.model
    if cfg.train.zero_stage == 3:
        # ZeRO-Inference: each rank holds a partition; DeepSpeed's hooks gather each module's
        # weights around its forward, and the recorder's hooks only read the outputs.
        ds = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
              "train_batch_size": cfg.train.micro_batch_size * dist_info.world_size,
              "zero_optimization": {"stage": 3}, "gradient_clipping": cfg.train.grad_clip}
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        model, device = engine.module, engine.device
    else:
        device = torch.device("cuda", dist_info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        model.to(device)
    per_rank = math.ceil(max_samples / (cfg.train.micro_batch_size * dist_info.world_size)) if max_samples else None
    source = data.micro_batches(epoch=0)
    micro = itertools.islice(source, per_rank)
    batches = (data.to_batch(f, 0, i, device) for i, f in enumerate(micro))
    try:
        return record(model, family, batches, family.neuron_sites(model), cfg.kernels.fused)
    finally:
        source.close()  # stops (and joins) the background readers now, not at interpreter exit


@register_defense("prune")
class FinePruning:
    def __init__(self, family):
        self.family = family

    def run(self, cfg) -> dict:
        out = Path(cfg.output_dir)
        with process_group(cfg.preempt.collective_timeout) as info:
            run_dir = RunDir(out)
            try:
                run_on_main(run_dir.claim, fresh=True, overwrite=cfg.overwrite)
                return self._run(cfg, info, out)
            finally:
                run_dir.release()

    def _run(self, cfg, info, out: Path) -> dict:
        t0 = time.time()
        family, p = self.family, cfg.prune
        if info.is_main:
            write_run_config(out, cfg)
        model_dir = Path(cfg.model.path)
        stats = neuron_statistics(family, family.load(model_dir, cfg), cfg, info, out, p.max_samples)
        # 0 takes the family's counts from method.md section 4 (BERT 4 / 6, ViT and CLIP 4 / 5, VGG in channels).
        gm = p.gm_layers or family.prune_defaults["gm_layers"]
        ga = p.ga_layers or family.prune_defaults["ga_layers"]
        keep = family.prune_defaults.get("fp_keep", 0)
        worth, key = {"fp-gm": (gm, "prune.gm_layers"), "fp-ga": (ga, "prune.ga_layers")}.get(p.variant, (0, ""))
        if worth >= len(stats):
            # The paper's counts are for 12-layer models; on a shallower one they would zero every
            # FFN neuron, and the "defense" would be a destroyed model.
            raise ConfigError(f"{key}: {worth:g} layers' worth of neurons (the {family.name} default from method.md when 0) is "
                              f">= the model's {len(stats)} FFN layers, so every neuron would be pruned; set {key} below {len(stats)}")
        chosen = prune_selection(stats, p.variant, gm, ga, fp_keep=keep)
        report = {}
        if info.is_main:
            # Prune a fresh copy: under ZeRO-3 the statistics' model holds only this rank's partition.
            fresh = family.load(model_dir, cfg)
            # One copy per tensor, so entries that share one (tied weights) still share it and the
            # export writes them as the input had them.
            copies: dict[int, torch.Tensor] = {}
            state = {k: copies.setdefault(id(v), v.detach().clone()) for k, v in fresh.model.state_dict(keep_vars=True).items()}
            apply_pruning(state, family.neuron_sites(fresh.model), chosen)
            files: list = []  # written aside, renamed into model/ when complete
            def write(d: Path) -> None:
                files.extend(family.export(fresh, state, d))
                carry_input_files(model_dir, d, replace=getattr(family, "verbatim_files", lambda keep: ())(False))

            write_dir_aside(out / "model", write)
            files = [out / "model" / Path(f).name for f in files]
            per_layer = {st.site.layer: len(chosen.get(st.site.layer, [])) for st in stats}
            report = {
                "variant": p.variant, "model": str(model_dir), "samples": stats[0].samples,
                "neurons_per_layer": stats[0].total.numel(), "pruned": sum(per_layer.values()), "pruned_per_layer": per_layer,
                "ranking": "mean first-token pre-activation over the auxiliary samples, lowest first",
                "layers_worth": {"fp": 1.0, "fp-gm": gm, "fp-ga": ga}[p.variant], "fp_keep": keep,
                "neurons": {str(k): v for k, v in chosen.items()},
                "mean_activation": {str(st.site.layer): st.mean.tolist() for st in stats},
                "wall_time_s": round(time.time() - t0, 2), "world_size": info.world_size, "zero_stage": cfg.train.zero_stage,
                "input_weights_sha256": sha256_files(fresh.weight_files), "output_weights_sha256": sha256_files(files),
            }
            (out / "prune.json").write_text(json.dumps(report, indent=2) + "\n")
            # The run directory's common summary (what `bench defense` and `slurm status` read).
            write_summary(out, {k: report[k] for k in ("variant", "pruned", "samples", "wall_time_s", "world_size", "zero_stage",
                                                       "output_weights_sha256")})
            rows = "\n".join(f"| {layer} | {n} | {n / report['neurons_per_layer']:.1%} |" for layer, n in per_layer.items())
            (out / "report.md").write_text(
                f"# Fine-pruning ({p.variant}): {model_dir}\n\n{report['pruned']} neurons pruned, ranked by {report['ranking']} "
                f"({report['samples']} samples).\n\n| layer | pruned | share |\n| --- | --- | --- |\n{rows}\n")
            print(f"prune {p.variant}: {report['pruned']} neurons zeroed "
                  f"({', '.join(f'L{k}:{v}' for k, v in per_layer.items() if v)}); wrote {out / 'model'}")
        barrier()
        return report
