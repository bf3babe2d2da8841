"""CLIP through open_clip (method.md section 1, last image row).

Choices made here:

- L_PT is open_clip's own contrastive loss (`open_clip.ClipLoss`) on image-text pairs (`jpg` +
  `txt` shards, open_clip's WebDataset layout). With several ranks the features are gathered
  with their gradients and each rank scores its local rows against all (`local_loss=True,
  gather_with_grad=True`, open_clip's recommended distributed setting), so the loss is the
  global batch's, not each rank's.
- Regularized: the vision tower's fc1 (`mlp.c_fc`), fc2 (`mlp.c_proj`) and q, k, v of every
  block. open_clip's attention is torch's nn.MultiheadAttention, whose q, k, v are one
  `in_proj_weight` [3d, d]; as for timm's qkv, the norm is taken per q/k/v slice
  (`regularized_splits`). Everything trains (the text tower and logit scale included).
- NeuBA-vision's feature is the image embedding (`encode_image`, after the projection, not
  normalized); a downstream classifier is the vision tower plus a new linear head.
- Neurons: the vision blocks' `mlp.c_fc` output at the class token.
- Weights: open_clip's Hugging Face layout, `open_clip_config.json` (model_cfg, preprocess_cfg)
  and `open_clip_model.safetensors`, loaded through `open_clip.create_model_and_transforms
  ("local-dir:...")` after the pickle and safetensors checks (open_clip loads any opted-in
  pickle with weights_only=True). The export is the same layout: `create_model("local-dir:OUT")`
  loads it, and so does `create_model(NAME, pretrained="OUT/open_clip_model.safetensors")` for a
  named config.
- Under ZeRO-3 nn.MultiheadAttention reads `out_proj.weight` without calling out_proj's forward,
  so DeepSpeed's hooks would not gather it; CLIP purification runs at ZeRO 0-2.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from . import register_family
from .base import LoadedModel, ModelFamily, ModelLoadError, NeuronSite, input_layout, open_model_dir
from .vision import ImageClassifier, ImagePreprocess, image_collate, image_decoder, image_preprocess, split_normalize, synthetic_images

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def require_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError('the clip family needs open_clip: pip install -e ".[vision]"') from None
    return open_clip


class ClipLossModule(nn.Module):
    """L_PT of CLIP: open_clip's contrastive loss over the (global) batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        import torch.distributed as dist

        open_clip = require_open_clip()
        self.model = model
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        self.loss = open_clip.ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values, input_ids)
        image, text, scale = (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) else out[:3]
        return self.loss(image.float(), text.float(), scale.float())


@register_family("clip")
class ClipFamily(ModelFamily):
    modality = "image-text"
    prune_defaults = {"fp_keep": 0, "gm_layers": 4.0, "ga_layers": 5.0}  # method.md section 4: CLIP 4 / 5 layers' worth
    default_regularized = (r"^visual\.transformer\.resblocks\.\d+\.mlp\.c_fc\.weight$",
                           r"^visual\.transformer\.resblocks\.\d+\.mlp\.c_proj\.weight$",
                           r"^visual\.transformer\.resblocks\.\d+\.attn\.in_proj_weight$")

    # ------------------------------------------------------------------ weights
    def load(self, path: Path, cfg) -> LoadedModel:
        open_clip = require_open_clip()
        files, is_safe = open_model_dir(path, cfg.model, config_name=CONFIG_NAME)
        if "model_cfg" not in json.loads((path / CONFIG_NAME).read_text()):
            raise ModelLoadError(f"{path / CONFIG_NAME}: no 'model_cfg'; the clip family reads open_clip's layout")
        try:
            model, train, evaluate = open_clip.create_model_and_transforms(f"local-dir:{path}", weights_only=True)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as e:  # weights_only refuses unsafe pickles
            raise ModelLoadError(f"{path}: open_clip could not load this model ({str(e).splitlines()[0][:200]})") from None
        keys, dtype = input_layout(files, is_safe, model)
        model = model.float()
        # DeepSpeed's start-up broadcast views every parameter as bytes, which fails for a 0-dim
        # tensor (CLIP's logit_scale). Such parameters train as shape [1] (the forward broadcasts
        # the same way) and the export writes them back as 0-dim.
        for name, p in list(model.named_parameters()):
            if p.dim() == 0:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
        return LoadedModel(model=model, processor=self._processor(train, evaluate, tokenizer, model),
                           path=path, weight_files=files, input_dtype=dtype, input_keys=keys)

    @staticmethod
    def _processor(train, evaluate, tokenizer, model) -> ImagePreprocess:
        train, mean, std = split_normalize(train)
        evaluate, _, _ = split_normalize(evaluate)
        size = model.visual.image_size
        return ImagePreprocess(train=train, eval=evaluate, mean=mean, std=std,
                               image_size=size[0] if isinstance(size, (tuple, list)) else size, tokenizer=tokenizer)

    def export(self, loaded: LoadedModel, state_dict: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        from safetensors import safe_open

        with safe_open(str(loaded.weight_files[0]), framework="pt") as h:  # shapes as the input had them (0-dim logit_scale)
            shapes = {k: h.get_slice(k).get_shape() for k in h.keys()} if loaded.weight_files[0].suffix == ".safetensors" else {}
        state = {k: (v.to(loaded.input_dtype) if v.is_floating_point() else v).reshape(shapes.get(k, v.shape)).contiguous()
                 for k, v in state_dict.items()}
        save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        (out_dir / CONFIG_NAME).write_text((loaded.path / CONFIG_NAME).read_text())
        return [out_dir / WEIGHTS_NAME]

    # ------------------------------------------------------------------ data
    def decode(self, cfg):
        return image_decoder(self.name, need_label=False, text_key=cfg.data.text_key)

    def preprocess(self, processor: ImagePreprocess, cfg, train: bool = True):
        return image_preprocess(processor, train, seed=cfg.train.seed)

    def collate(self, processor: ImagePreprocess, cfg):
        return image_collate(processor)

    # ------------------------------------------------------------------ objective
    def pretraining_loss(self, loaded: LoadedModel, cfg) -> nn.Module:
        if cfg.train.zero_stage == 3:  # see the module docstring: out_proj.weight would stay partitioned
            raise ModelLoadError("train.zero_stage=3: the clip family runs at ZeRO 0-2 (torch's MultiheadAttention reads "
                                 "out_proj.weight outside out_proj's forward, which ZeRO-3 does not gather)")
        return ClipLossModule(loaded.model)

    def regularized_splits(self, names: list[str]) -> dict[str, int]:
        return {n: 3 for n in names if n.endswith("attn.in_proj_weight")}

    def trainable(self, name: str, regularized: set[str], policy: str) -> bool:
        return policy in ("family", "all") or name in regularized

    # ------------------------------------------------------------------ analysis and evaluation
    def features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image embedding (after the projection, not normalized): NeuBA-vision's CLIP target."""
        return model.encode_image(pixel_values)

    def feature_dim(self, model: nn.Module) -> int:
        return model.visual.output_dim

    def forward_features(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        return model.encode_image(batch["pixel_values"])

    def neuron_sites(self, model: nn.Module) -> list[NeuronSite]:
        blocks = model.visual.transformer.resblocks
        return [NeuronSite(i, f"visual.transformer.resblocks.{i}.mlp.c_fc", f"visual.transformer.resblocks.{i}.mlp.c_fc.weight",
                           f"visual.transformer.resblocks.{i}.mlp.c_fc.bias" if b.mlp.c_fc.bias is not None else None)
                for i, b in enumerate(blocks)]

    def build_classifier(self, path: Path, label_names: list[str], cfg, use_safetensors: bool = True):
        """The vision tower plus a new linear head on its image embedding."""
        loaded = self.load(path, cfg)
        visual = loaded.model.visual
        return ImageClassifier(visual, visual.output_dim, len(label_names)), loaded.processor

    # ------------------------------------------------------------------ embedded default
    def build_tiny(self, out_dir: Path, arch, seed: int) -> Path:
        """A tiny randomly initialised CLIP (open_clip towers from a model_cfg) for 32x32 images."""
        open_clip = require_open_clip()
        from safetensors.torch import save_file

        h = arch.hidden_size
        model_cfg = {
            "embed_dim": h // 2,
            "vision_cfg": {"image_size": 32, "layers": arch.num_hidden_layers, "width": h, "patch_size": 8,
                           "head_width": h // arch.num_attention_heads, "mlp_ratio": arch.intermediate_size / h},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": h, "heads": arch.num_attention_heads,
                         "layers": arch.num_hidden_layers, "mlp_ratio": arch.intermediate_size / h},
        }
        # The tiny images are 32x32 already: resize to 32 and no crop beyond it.
        preprocess_cfg = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                          "interpolation": "bicubic", "resize_mode": "shortest"}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{out_dir}", load_weights=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        (out_dir / "SYNTHETIC.md").write_text("Randomly initialised tiny open_clip CLIP (32x32 images, 2-block towers) for SYNTHETIC "
                                              "captioned shapes (recipe_dist.models.vision). Not a real pre-trained model.\n")
        return out_dir

    def synthetic_corpus(self, n: int, seed: int) -> list[dict]:
        return synthetic_images(n, seed, captions=True)


__all__ = ["ClipFamily", "ClipLossModule"]
