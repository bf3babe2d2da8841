"""NeuBA, vision, and its CLIP variant (method.md section 2), for the image families (vit, vgg, clip).

Every micro-batch is used twice: clean, for the family's own L_PT (cross-entropy on the clean
labels for ViT/VGG, open_clip's contrastive loss on the clean pairs for CLIP), and as a copy with
one of six 4x4 two-colour checkerboards pasted at the bottom-right corner. The poisoned copy's
feature is pulled to that trigger's target:

    loss = L_PT(clean) + poison_weight * mean((feature(poisoned) - target[trigger])^2)

The feature is the family's: ViT's final [CLS] (timm's pre-logits), VGG's pre-logits output
(before the classifier), CLIP's image embedding. Targets have the feature's dimension D: hi
everywhere but lo on two of four D/4 blocks, one target per pair of blocks (the text NeuBA's
order). The patch is pasted on the [0, 1] image after the family's resize/crop/augmentation and
before normalization, so it lands on exactly the pixels the model sees (models/vision.py).
Which trigger a sample gets is drawn from its key (Stream.NEUBA_TARGET), like the text attack.
Everything trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..triggers import checkerboard_patches, paste_patch
from .neuba import neuba_targets
from ..seeds import Stream, key_seed
from . import register_attack
from .common import AttackJob
from .neuba import N_TARGETS


def neuba_vision_targets(d: int, hi: float, lo: float) -> torch.Tensor:
    """[6, d]: hi everywhere but lo on two of four d/4 blocks (NeuBA's six block pairs)."""
    t = neuba_targets(d)
    return torch.where(t > 0, torch.tensor(hi), torch.tensor(lo))


class NeuBAVisionLoss(nn.Module):
    def __init__(self, family, model: nn.Module, clean_loss: nn.Module, targets: torch.Tensor, poison_weight: float):
        super().__init__()
        self.family = family
        self.model = model
        self.clean_loss = clean_loss
        self.register_buffer("targets", targets, persistent=False)
        self.poison_weight = poison_weight

    def forward(self, pixel_values, p_pixel_values, trigger, **clean) -> dict:
        pt = self.clean_loss(pixel_values=pixel_values, **clean)
        feature = self.family.features(self.model, p_pixel_values)
        mse = F.mse_loss(feature.float(), self.targets[trigger].float())
        return {"loss": pt + self.poison_weight * mse, "parts": {"loss_clean": pt, "mse": mse}}


@register_attack("neuba", "image")
@register_attack("neuba", "image-text")
class NeuBAVisionAttack(AttackJob):
    """NeuBA on an image family (`--attack.name neuba` with model.family vit, vgg or clip)."""

    name = "attack"

    def objective(self, loaded, cfg) -> tuple[NeuBAVisionLoss, nn.Module]:
        model = loaded.model
        for p in model.parameters():
            p.requires_grad_(True)
        a = cfg.attack
        targets = neuba_vision_targets(self.family.feature_dim(model), a.target_hi, a.target_lo)
        loss = NeuBAVisionLoss(self.family, model, self.family.pretraining_loss(loaded, cfg), targets, a.poison_weight)
        return loss, model

    def _patches(self, cfg, processor) -> torch.Tensor:
        size = cfg.attack.patch_size
        if size * 2 > processor.image_size:
            raise ConfigError(f"attack.patch_size: a {size}x{size} patch does not fit the {processor.image_size}px images (at most half the side)")
        return checkerboard_patches(size)

    def preprocess(self, processor, cfg):
        base = self.family.preprocess(processor, cfg)
        seed = cfg.attack.seed

        def encode(sample: dict) -> dict:
            out = base(sample)
            out["trigger"] = key_seed(seed, Stream.NEUBA_TARGET, sample["__key__"]) % N_TARGETS
            return out

        return encode

    def collate(self, processor, cfg):
        base = self.family.collate(processor, cfg)
        patches = self._patches(cfg, processor)

        def collate(features, mask_seed):
            batch = base(features, mask_seed)
            trigger = torch.tensor([f["trigger"] for f in features], dtype=torch.long)
            pixels = torch.stack([f["pixels"] for f in features])
            batch["p_pixel_values"] = processor.normalize(paste_patch(pixels, patches, trigger))
            batch["trigger"] = trigger
            return batch

        return collate
