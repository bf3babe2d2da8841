"""What the attacks (POR, NeuBA, BadPre) share: the job base and the masked mean."""

from __future__ import annotations

import torch
from torch import nn

from ..jobs import FamilyJob
from ..models import LoadedModel, ModelLoadError
from ..objective import Regularized


def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-d tensor; 0 (still on the graph) when it is empty, so a micro-batch with no label is not NaN."""
    return x.sum() / max(x.numel(), 1)


def encoder_with_pooler(loaded: LoadedModel, attack: str) -> nn.Module:
    """The backbone of an MLM model (its pooler kept by the family's load); POR and NeuBA need the pooler."""
    model = loaded.model
    encoder = getattr(model, model.base_model_prefix)
    if getattr(encoder, "pooler", None) is None:
        raise ModelLoadError(f"{loaded.path}: {attack} needs an encoder with a pooler; this model has none")
    return encoder


class AttackJob(FamilyJob):
    """An attack: loads, preprocesses and exports through its family (FamilyJob). A subclass
    gives `objective`, the poisoning loss module (returning {"loss", "parts"}) and the module
    whose regularized weights the adaptive variant penalises.

    The adaptive attack (attack.adaptive_lam > 0) adds adaptive_lam * sum ||W||_F over the
    family's regularized weights, through the same `Regularized` wrapper as purification.
    """

    name = "attack"

    def objective(self, loaded: LoadedModel, cfg) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def build_task(self, loaded: LoadedModel, cfg) -> Regularized:
        loss, adaptive_over = self.objective(loaded, cfg)
        lam = cfg.attack.adaptive_lam
        names = self.family.regularized_names(adaptive_over, list(cfg.model.regularized)) if lam > 0 else []
        return Regularized(loss, adaptive_over, names, lam, splits=self.family.regularized_splits(names))
