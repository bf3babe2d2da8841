"""RECIPE (method.md section 1): continual pre-training with lam * sum_i ||W_i||_F.

The family gives the pre-training loss, the regularized sites and the trainable policy; the
objective is the shared `Regularized` wrapper. Nothing here knows the model or the modality.
"""

from __future__ import annotations

from torch import nn

from ..jobs import FamilyJob
from ..models import LoadedModel
from ..objective import Regularized
from . import register_defense


@register_defense("purify")
class RecipeJob(FamilyJob):
    def build_task(self, loaded: LoadedModel, cfg) -> nn.Module:
        family, model = self.family, loaded.model
        names = family.regularized_names(model, list(cfg.model.regularized))
        family.set_trainable(model, set(names), cfg.model.trainable)
        return Regularized(family.pretraining_loss(loaded, cfg), model, names, cfg.regularizer.lam, cfg.regularizer.pt_weight,
                           family.regularized_splits(names))
