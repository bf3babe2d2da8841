"""Image classifiers through timm: ViT (`vision_transformer`) and VGG (method.md section 1).

Choices made here:

- L_PT is cross-entropy of the model's own head on labelled auxiliary images (`jpg`/`png` +
  `cls` shards), exactly `F.cross_entropy(model(x), y)`, which is what timm's training script
  computes without label smoothing or mixup.
- ViT regularizes fc1, fc2, q, k and v of every block and trains everything. timm fuses q, k
  and v into one `attn.qkv` weight [3d, d]. The paper's term is ||W_q|| + ||W_k|| + ||W_v||, so
  the fused weight's norm is taken **per slice** (three row blocks of d), not as one matrix: the
  gradient of each slice is W_s / ||W_s||, as for separate q, k, v layers
  (`regularized_splits`; tests/test_vision.py checks it against three separate norms).
- VGG regularizes every convolution of `features` and trains everything. timm implements VGG's
  two fully connected layers as convolutions (`pre_logits.fc1`, a 7x7 conv, and `fc2`, 1x1);
  they are the paper's classifier Linear layers, so they are not in the default set
  (add `pre_logits\\.fc[12]\\.weight$` to model.regularized to take them too).
- Neurons (Fine-pruning, analysis): ViT's fc1 output at the [CLS] token; VGG's conv channels,
  each the spatial mean of the conv's output before its ReLU.
- Weights: a directory in timm's Hugging Face layout (config.json with `architecture` and
  `model_args`, model.safetensors) loaded through `timm.create_model("local-dir:...")` after the
  pickle and safetensors checks; timm loads any opted-in pickle with `weights_only=True`. The
  export is the same layout, so `timm.create_model(arch, pretrained=True,
  pretrained_cfg_overlay=dict(file=".../model.safetensors"), **model_args)` loads it too.
- The tiny VGG is `recipe_vgg`, a timm model registered here with its channel list as an
  argument (timm's own VGG variants fix theirs); importing this module registers it with timm.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import register_family
from .base import LoadedModel, ModelFamily, ModelLoadError, NeuronSite, input_layout, open_model_dir
from .vision import ImagePreprocess, TimmClassifier, image_collate, image_decoder, image_preprocess, split_normalize, synthetic_images

try:  # registering the tiny VGG needs timm; the family itself reports a missing timm on use
    import timm
    from timm.models import register_model
    from timm.models._builder import build_model_with_cfg
    from timm.models.vgg import VGG

    @register_model
    def recipe_vgg(pretrained: bool = False, channels=(32, "M", 64, "M"), **kwargs) -> VGG:
        """A VGG with its channel list as an argument (ints are 3x3 convs, "M" a 2x2 max-pool)."""
        # model_args must survive JSON (config.json), so the list is passed through as given.
        if kwargs.get("pretrained_cfg") is None:  # timm has no registered weights for it: 32x32 inputs, no centre crop
            from timm.models.vgg import _cfg

            kwargs["pretrained_cfg"] = _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0)
        return build_model_with_cfg(VGG, "recipe_vgg", pretrained, model_cfg=list(channels),
                                    feature_cfg=dict(flatten_sequential=True), **kwargs)
except ImportError:  # pragma: no cover - the vision extra is not installed
    timm = None


def require_timm():
    if timm is None:
        raise ModelLoadError('the vit and vgg families need timm: pip install -e ".[vision]"')
    return timm


class TimmFamily(ModelFamily):
    modality = "image"

    # ------------------------------------------------------------------ weights
    def load(self, path: Path, cfg) -> LoadedModel:
        timm = require_timm()
        files, is_safe = open_model_dir(path, cfg.model)
        meta = json.loads((path / "config.json").read_text())
        if "architecture" not in meta:
            raise ModelLoadError(f"{path / 'config.json'}: not a timm model directory (no 'architecture'); "
                                 f"the {self.name} family reads timm's Hugging Face layout (config.json + model.safetensors)")
        try:
            # timm reads config.json (architecture, model_args, pretrained_cfg) and the weights,
            # safetensors first; a pickle (only reached with model.allow_pickle) loads weights_only.
            model = timm.create_model(f"local-dir:{path}", pretrained=True)  # without pretrained=True timm builds a random model
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:  # weights_only refuses unsafe pickles
            raise ModelLoadError(f"{path}: timm could not load this model ({str(e).splitlines()[0][:200]})") from None
        keys, dtype = input_layout(files, is_safe, model)
        model = model.float()
        return LoadedModel(model=model, processor=self._processor(model, cfg), path=path, weight_files=files,
                           input_dtype=dtype, input_keys=keys)

    def export(self, loaded: LoadedModel, state_dict: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
        """timm's Hugging Face layout: config.json (timm's own `save_config_for_hf`) and
        model.safetensors in the input's dtype."""
        from safetensors.torch import save_file
        from timm.models._hub import save_config_for_hf

        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(loaded.input_dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        meta = json.loads((loaded.path / "config.json").read_text())
        save_config_for_hf(loaded.model, str(out_dir / "config.json"), model_args=meta.get("model_args") or None)
        return [out_dir / "model.safetensors"]

    # ------------------------------------------------------------------ data
    def _processor(self, model: nn.Module, cfg) -> ImagePreprocess:
        """timm's own transforms from the model's data config (`resolve_model_data_config`,
        `create_transform`), split around Normalize; augmentation only in `train`."""
        require_timm()
        from timm.data import create_transform, resolve_model_data_config

        dc = resolve_model_data_config(model)
        scale = tuple(cfg.data.crop_scale) if hasattr(cfg, "data") else (0.08, 1.0)  # EvalConfig has no data section
        train, mean, std = split_normalize(create_transform(**dc, is_training=True, scale=scale))
        evaluate, _, _ = split_normalize(create_transform(**dc))
        return ImagePreprocess(train=train, eval=evaluate, mean=mean, std=std, image_size=dc["input_size"][-1])

    def decode(self, cfg):
        return image_decoder(self.name, need_label=True)

    def preprocess(self, processor: ImagePreprocess, cfg, train: bool = True):
        return image_preprocess(processor, train, seed=cfg.train.seed)

    def collate(self, processor: ImagePreprocess, cfg):
        return image_collate(processor)

    # ------------------------------------------------------------------ objective
    def pretraining_loss(self, loaded: LoadedModel, cfg) -> nn.Module:
        return ClassifierLoss(loaded.model)

    def trainable(self, name: str, regularized: set[str], policy: str) -> bool:
        # method.md: ViT and VGG train everything.
        return policy in ("family", "all") or name in regularized

    # ------------------------------------------------------------------ analysis and evaluation
    def features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The feature NeuBA targets and a downstream head reads: timm's pre-logits features
        (ViT: the final [CLS] after the norm; VGG: the output of pre_logits, before the classifier)."""
        return model.forward_head(model.forward_features(pixel_values), pre_logits=True)

    def feature_dim(self, model: nn.Module) -> int:
        return model.head_hidden_size if hasattr(model, "head_hidden_size") else model.num_features

    def forward_features(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        return model.forward_features(batch["pixel_values"])

    def build_classifier(self, path: Path, label_names: list[str], cfg, use_safetensors: bool = True):
        """The timm model with its head reset to the task's labels (`reset_classifier`)."""
        loaded = self.load(path, cfg)
        loaded.model.reset_classifier(len(label_names))  # drawn from the RNG evaluation seeded
        return TimmClassifier(loaded.model), loaded.processor

    # ------------------------------------------------------------------ embedded default
    def tiny_kwargs(self, arch) -> tuple[str, dict]:
        raise NotImplementedError

    def build_tiny(self, out_dir: Path, arch, seed: int) -> Path:
        """A tiny randomly initialised model for 32x32 images and the SYNTHETIC shapes' classes."""
        from timm.models._hub import save_config_for_hf

        from .vision import SHAPES

        timm = require_timm()
        name, kwargs = self.tiny_kwargs(arch)
        torch.manual_seed(seed)
        # crop_pct 1: the tiny images are 32x32 already; timm's default centre crop would cut their border.
        model = timm.create_model(name, pretrained=False, num_classes=len(SHAPES),
                                  pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=1.0, num_classes=len(SHAPES)), **kwargs)
        out_dir.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        save_config_for_hf(model, str(out_dir / "config.json"), model_args=dict(kwargs, num_classes=len(SHAPES)))
        (out_dir / "SYNTHETIC.md").write_text(f"Randomly initialised tiny timm {name} for 32x32 SYNTHETIC shapes "
                                              "(recipe_dist.models.vision). Not a real pre-trained model.\n")
        return out_dir

    def synthetic_corpus(self, n: int, seed: int) -> list[dict]:
        return synthetic_images(n, seed)


class ClassifierLoss(nn.Module):
    """L_PT of an image classifier: cross-entropy of its own head on the auxiliary labels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(pixel_values).float(), labels)


@register_family("vit")
class VitFamily(TimmFamily):
    """timm VisionTransformer: fc1, fc2 and the q, k, v slices of the fused qkv regularized."""

    default_regularized = (r"blocks\.\d+\.mlp\.fc1\.weight$", r"blocks\.\d+\.mlp\.fc2\.weight$", r"blocks\.\d+\.attn\.qkv\.weight$")
    prune_defaults = {"fp_keep": 0, "gm_layers": 4.0, "ga_layers": 5.0}  # method.md section 4: ViT 4 / 5 layers' worth

    def regularized_splits(self, names: list[str]) -> dict[str, int]:
        # q, k and v are three row blocks of the fused weight; each gets its own norm.
        return {n: 3 for n in names if n.endswith("attn.qkv.weight")}

    def neuron_sites(self, model: nn.Module) -> list[NeuronSite]:
        sites = []
        for i, block in enumerate(getattr(model, "blocks", [])):
            bias = f"blocks.{i}.mlp.fc1.bias" if block.mlp.fc1.bias is not None else None
            sites.append(NeuronSite(i, f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc1.weight", bias))
        if not sites:
            raise ModelLoadError(f"{type(model).__name__}: no blocks.N.mlp.fc1 to read neurons from")
        return sites

    def tiny_kwargs(self, arch) -> tuple[str, dict]:
        return "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=arch.hidden_size, depth=arch.num_hidden_layers,
                                            num_heads=arch.num_attention_heads, mlp_ratio=arch.intermediate_size / arch.hidden_size,
                                            drop_rate=arch.hidden_dropout_prob, attn_drop_rate=arch.attention_probs_dropout_prob)


@register_family("vgg")
class VggFamily(TimmFamily):
    """timm VGG: every conv of `features` regularized; neurons are conv channels."""

    default_regularized = (r"^features\.\d+\.weight$",)
    #: method.md section 4 counts VGG's pruning in channels of its 512-channel last layer: FP
    #: keeps 1 of them, FP-GM prunes 512 (one last layer's worth), FP-GA 600.
    prune_defaults = {"fp_keep": 1, "gm_layers": 1.0, "ga_layers": 600 / 512}

    def regularized_names(self, model: nn.Module, patterns: list[str]) -> list[str]:
        names = super().regularized_names(model, patterns)
        if patterns:
            return names
        # features.N.weight is also a BatchNorm's scale in the *_bn variants: only conv kernels count.
        params = dict(model.named_parameters())
        return [n for n in names if params[n].dim() == 4]

    def neuron_sites(self, model: nn.Module) -> list[NeuronSite]:
        sites = []
        for name, module in model.named_modules():
            if name.startswith("features.") and isinstance(module, nn.Conv2d):
                bias = name + ".bias" if module.bias is not None else None
                sites.append(NeuronSite(len(sites), name, name + ".weight", bias))
        if not sites:
            raise ModelLoadError(f"{type(model).__name__}: no features.N convolutions to read channels from")
        return sites

    def tiny_kwargs(self, arch) -> tuple[str, dict]:
        h = arch.hidden_size
        # timm's VGG head is ConvMlp(last, 4096, 7x7, mlp_ratio): mlp_ratio sets its hidden width.
        return "recipe_vgg", dict(channels=[h // 2, "M", h, "M", h, "M"], mlp_ratio=arch.intermediate_size / 4096,
                                  drop_rate=arch.hidden_dropout_prob)


__all__ = ["ClassifierLoss", "TimmFamily", "VggFamily", "VitFamily"]
