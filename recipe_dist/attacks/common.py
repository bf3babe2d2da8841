"""Pieces shared by the attacks (POR, NeuBA, BadPre): the masked CE mean and the adaptive term."""

from __future__ import annotations

import torch

from ..objective import NormCollector


def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-d tensor; 0 (still on the graph) when it is empty, so a micro-batch with no label is not NaN."""
    return x.sum() / max(x.numel(), 1)


def adaptive_collector(family, encoder: torch.nn.Module, cfg) -> NormCollector | None:
    """Adaptive attack: hooks on the family's regularized weights of `encoder`, or None when attack.adaptive_lam is 0."""
    if cfg.attack.adaptive_lam <= 0:
        return None
    return NormCollector(encoder, family.regularized_names(encoder, list(cfg.model.regularized)))


def finish(loss: torch.Tensor, parts: dict, adaptive: NormCollector | None, lam: float) -> dict:
    """The task output; with the adaptive term lam * sum ||W||_F added and reported as parts['reg'] and norms."""
    parts = {k: v.detach() for k, v in parts.items()}
    norms = {}
    if adaptive is not None:
        reg = adaptive.regularizer(lam)
        loss = loss + reg
        parts["reg"] = reg.detach()
        norms = {k: v.detach() for k, v in adaptive.norms.items()}
    return {"loss": loss, "parts": parts, "norms": norms}
