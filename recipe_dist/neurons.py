"""Neuron statistics, pruning masks and the poison-only analysis (method.md sections 4 and 5).

A neuron is one output feature of a family's neuron site (BERT: intermediate.dense, before the
activation), read at the first token. `ActivationRecorder` hooks every site and accumulates, per
neuron, the sum of those pre-activations and the number of samples where it is > 0, with the
activation-statistics kernel (`kernels.activation_stats`, Triton on CUDA). Statistics from
several ranks are summed with one all-reduce, so any number of ranks reads any share of the
data; under ZeRO-3 the hooks see the module outputs, never the partitioned placeholder weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .kernels import activation_stats, use_fused
from .models.base import NeuronSite


@dataclass
class SiteStats:
    site: NeuronSite
    total: torch.Tensor  # [I] fp32: sum over samples of the first-token pre-activation
    positive: torch.Tensor  # [I] int64: samples with the pre-activation > 0
    samples: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.samples, 1)

    @property
    def share_positive(self) -> torch.Tensor:
        return self.positive.double() / max(self.samples, 1)


class ActivationRecorder:
    """Forward hooks on `sites` of `model`; use as a context manager around the forwards to record."""

    def __init__(self, model: nn.Module, sites: list[NeuronSite], fused: str = "auto"):
        self.sites = sites
        self.fused = fused
        self.stats: dict[str, SiteStats] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[s.module].register_forward_hook(self._hook(s)) for s in sites]

    def _hook(self, site: NeuronSite):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if out.dim() == 4:
                # A conv's channels [B, C, H, W]: one value per channel and sample, its spatial mean
                # (Fine-pruning's channel activation), read as a one-token sequence.
                out = out.mean(dim=(2, 3)).unsqueeze(1)
            total, positive = activation_stats(out.detach(), fused=use_fused(out.device, self.fused))
            st = self.stats.get(site.module)
            if st is None:
                self.stats[site.module] = SiteStats(site, total, positive, out.shape[0])
            else:
                st.total += total
                st.positive += positive
                st.samples += out.shape[0]

        return hook

    def __enter__(self) -> "ActivationRecorder":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> list[SiteStats]:
        """Per site, in layer order, summed over ranks (one all-reduce when a process group exists)."""
        out = [self.stats[s.module] for s in self.sites]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([torch.cat([st.total.double(), st.positive.double(), torch.tensor([float(st.samples)], device=st.total.device)])
                              for st in out])
            dist.all_reduce(flat)
            at = 0
            for st in out:
                n = st.total.numel()
                st.total = flat[at : at + n].float()
                st.positive = flat[at + n : at + 2 * n].round().long()
                st.samples = int(flat[at + 2 * n].item())
                at += 2 * n + 1
        return out


def record(model: nn.Module, family, batches, sites: list[NeuronSite] | None = None, fused: str = "auto") -> list[SiteStats]:
    """Statistics of `family`'s neuron sites of `model` over `batches` (dicts from feature_inputs)."""
    from .models.base import eval_mode

    sites = sites or family.neuron_sites(model)
    if not sites:
        from .models.base import ModelLoadError

        raise ModelLoadError(f"model.family={family.name}: no neuron sites in {type(model).__name__}; pruning and analysis need them")
    device = next(model.parameters()).device
    with ActivationRecorder(model, sites, fused) as rec, torch.no_grad(), eval_mode(model):
        for batch in batches:
            family.forward_features(model, {k: v.to(device) for k, v in batch.items()})
    return rec.result()


# ------------------------------------------------------------------ Fine-pruning


def prune_selection(stats: list[SiteStats], variant: str, gm_layers: float = 4.0, ga_layers: float = 6.0,
                    fp_keep: int = 0) -> dict[int, list[int]]:
    """Neurons to prune, layer -> sorted indices, ranked by mean activation, lowest first.

    fp: the last layer's neurons but the `fp_keep` most active (VGG keeps 1 of 512). fp-gm /
    fp-ga: the globally lowest `gm_layers` / `ga_layers` layers' worth of neurons, a layer's
    worth being the last layer's width (FP-GM prunes across layers, not per layer); ties are
    broken by (layer, index) so the choice is deterministic.
    """
    if variant == "fp":
        last = stats[-1]
        ranked = sorted(range(last.total.numel()), key=lambda j: (float(last.mean[j]), j))
        return {last.site.layer: sorted(ranked[: len(ranked) - fp_keep])}
    worth = {"fp-gm": gm_layers, "fp-ga": ga_layers}[variant]
    per_layer = stats[-1].total.numel()
    count = min(int(round(worth * per_layer)), sum(st.total.numel() for st in stats))
    ranked = sorted((float(v), st.site.layer, j) for st in stats for j, v in enumerate(st.mean.tolist()))
    chosen: dict[int, list[int]] = {}
    for _, layer, j in ranked[:count]:
        chosen.setdefault(layer, []).append(j)
    return {layer: sorted(idx) for layer, idx in sorted(chosen.items())}


def apply_pruning(state: dict[str, torch.Tensor], sites: list[NeuronSite], chosen: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """Zero each chosen neuron's weight slice (along the site's axis) and bias entry, in place."""
    by_layer = {s.layer: s for s in sites}
    for layer, idx in chosen.items():
        site = by_layer[layer]
        index = torch.tensor(idx, dtype=torch.long)
        w = state[site.weight]
        state[site.weight] = w.index_fill(site.axis, index, 0)
        if site.bias is not None:
            state[site.bias] = state[site.bias].index_fill(0, index, 0)
    return state


# ------------------------------------------------------------------ analysis (method.md section 5)


def activated(stats: SiteStats, threshold: float = 0.5) -> torch.Tensor:
    """Neurons > 0 on more than `threshold` of the samples (bool [I])."""
    return stats.share_positive > threshold


def overlap(clean: list[SiteStats], poisoned: list[SiteStats], threshold: float = 0.5) -> dict:
    """Overlap ratio |clean ∩ poisoned| / |poisoned| and poison-only neurons, per layer and in total."""
    layers, inter_all, pois_all, only_all = [], 0, 0, 0
    for c, p in zip(clean, poisoned):
        ac, ap = activated(c, threshold), activated(p, threshold)
        inter, n_p, only = int((ac & ap).sum()), int(ap.sum()), int((ap & ~ac).sum())
        layers.append({"layer": c.site.layer, "activated_clean": int(ac.sum()), "activated_poisoned": n_p,
                       "overlap_ratio": inter / n_p if n_p else float("nan"), "poison_only": only})
        inter_all, pois_all, only_all = inter_all + inter, pois_all + n_p, only_all + only
    return {"overlap_ratio": inter_all / pois_all if pois_all else float("nan"), "poison_only": only_all,
            "threshold": threshold, "layers": layers}
