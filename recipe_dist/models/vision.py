"""What the image families (timm ViT and VGG, open_clip CLIP) share: decoding image shards,
preprocessing split around normalization, patch triggers, the downstream classifier wrapper and
the SYNTHETIC shapes corpus.

Normalization is split from the rest of the family's transform (timm's `create_transform`,
open_clip's preprocess both end in `Normalize`). Workers produce images in [0, 1] after resize,
crop and augmentation; the batch is normalized when it is collated. That is where NeuBA-vision
pastes its patch (method.md section 2: "pasted at the bottom-right corner before
normalization"): on the image the model sees, after cropping, so the patch is never cropped away.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.storage import DataError
from ..seeds import Stream, key_seed

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # open_clip's WebDataset layout names the image by its extension
LABEL_FIELD = "cls"


@dataclass
class ImagePreprocess:
    """The family's preprocessing with normalization split off. `train` / `eval`: PIL image ->
    float tensor [3, H, W] in [0, 1]; `mean` / `std`: per channel, applied by `normalize`."""

    train: Callable
    eval: Callable
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    tokenizer: Callable | None = None  # CLIP: open_clip's tokenizer (texts -> [N, context] ids)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


def seeded(seed: int, fn: Callable, *args):
    """`fn(*args)` with torch's, Python's and NumPy's global RNGs seeded from `seed`, and all three
    restored after: torchvision's and timm's random transforms draw from those globals."""
    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return fn(*args)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def image_preprocess(pre: "ImagePreprocess", train: bool = True, seed: int = 0):
    """Decoded sample -> {"__key__", "pixels" ([3, H, W] in [0, 1], the train or eval transform),
    "input_ids" (a caption, through pre.tokenizer), "label"}; runs in DataLoader workers. The
    training transform's random crop and flip are drawn per (seed, epoch, sample key), so a run
    is reproducible and a resumed one sees the crops the uninterrupted run would have."""
    transform = pre.train if train else pre.eval

    def encode(sample: dict) -> dict:
        if train:
            draw = key_seed(seed, Stream.IMAGE_AUGMENT, f"{sample.get('__epoch__', 0)}/{sample['__key__']}")
            pixels = seeded(draw, transform, sample["image"])
        else:
            pixels = transform(sample["image"])
        out = {"__key__": sample["__key__"], "pixels": pixels}
        if "text" in sample:
            out["input_ids"] = pre.tokenizer([sample["text"]])[0]
        if "label" in sample:
            out["label"] = sample["label"]
        return out

    return encode


def image_collate(pre: "ImagePreprocess"):
    """Preprocessed samples -> {"pixel_values" (normalized), "input_ids"?, "labels"?}; nothing random."""

    def collate(features: list[dict], mask_seed: int) -> dict:
        batch = {"pixel_values": pre.normalize(torch.stack([f["pixels"] for f in features]))}
        if "input_ids" in features[0]:
            batch["input_ids"] = torch.stack([f["input_ids"] for f in features])
        if "label" in features[0]:
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return batch

    return collate


def split_normalize(transform) -> tuple[Callable, tuple, tuple]:
    """(transform without its final Normalize, mean, std) of a torchvision Compose."""
    from torchvision import transforms as T

    steps = list(transform.transforms)
    if not steps or not isinstance(steps[-1], T.Normalize):
        raise ValueError(f"expected a transform ending in Normalize, got {transform}")
    norm = steps.pop()
    return T.Compose(steps), tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)


def open_image(raw: bytes, where: str):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError or SyntaxError on bad bytes
        raise DataError(f"{where}: not a readable image ({str(e).splitlines()[0][:100]})") from None
    return img.convert("RGB")


def image_decoder(family: str, need_label: bool, text_key: str | None = None) -> Callable[[dict], dict]:
    """Raw shard sample -> {"__key__", "image" (PIL RGB), "label"? , "text"?}; a sample without
    what the family trains on is one DataError naming the sample and the shard."""

    def decode(sample: dict) -> dict:
        where = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field is None:
            raise DataError(f"{where} has no image field ({'/'.join(IMAGE_FIELDS)}); the {family} family trains on images")
        out = {"__key__": sample["__key__"], "image": open_image(sample[field], where)}
        if need_label:
            if LABEL_FIELD not in sample:
                raise DataError(f"{where} has no '{LABEL_FIELD}' field: the {family} family's L_PT is cross-entropy on "
                                "labelled images (jpg/png + cls)")
            raw = sample[LABEL_FIELD]
            try:
                out["label"] = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
            except ValueError:
                raise DataError(f"{where}: '{LABEL_FIELD}' must be an integer class index, got {raw[:40]!r}") from None
        if text_key is not None:
            if text_key not in sample:
                raise DataError(f"{where} has no '{text_key}' field: the {family} family trains on image-text pairs (jpg + {text_key})")
            raw = sample[text_key]
            out["text"] = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        return out

    return decode


# ------------------------------------------------------------------ patch triggers (NeuBA-vision)

# ------------------------------------------------------------------ downstream classifier


class ImageClassifier(nn.Module):
    """An image encoder (e.g. CLIP's vision tower: pixels -> embedding) plus a new linear head,
    with the interface evaluation uses (transformers-style: forward(pixel_values, labels=None) -> .logits, .loss)."""

    def __init__(self, encoder: nn.Module, dim: int, num_labels: int):
        super().__init__()
        self.backbone = encoder
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.classifier(self.backbone(pixel_values))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


class TimmClassifier(nn.Module):
    """A timm model whose own head was reset to the task's labels (timm's `reset_classifier`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.model(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


# ------------------------------------------------------------------ SYNTHETIC shapes corpus

SHAPES = ("square", "disc", "triangle", "bars", "stripes", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30)}


def synthetic_shape(rng: random.Random, size: int = 32):
    """One SYNTHETIC image: a randomly placed, sized and coloured shape on a noisy background;
    returns (PIL image, class index of the shape, caption)."""
    from PIL import Image, ImageDraw

    label = rng.randrange(len(SHAPES))
    colour = rng.choice(sorted(COLOURS))
    bg = tuple(rng.randrange(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    fill = COLOURS[colour]
    shape = SHAPES[label]
    if shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "bars":
        for x in range(cx - r, cx + r, 4):
            draw.rectangle([x, cy - r, x + 1, cy + r], fill=fill)
    elif shape == "stripes":
        for y in range(cy - r, cy + r, 4):
            draw.rectangle([cx - r, y, cx + r, y + 1], fill=fill)
    else:
        w = max(1, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    noise = bytes(rng.randrange(0, 24) for _ in range(size * size * 3))
    img = Image.blend(img, Image.frombytes("RGB", (size, size), noise), 0.15)
    return img, label, f"a {colour} {shape}"


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_images(n: int, seed: int, size: int = 32, captions: bool = False) -> list[dict]:
    """`n` SYNTHETIC shard records: {"png", "cls"} (or {"png", "txt"} with `captions`)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img, label, caption = synthetic_shape(rng, size)
        rec = {"png": png_bytes(img)}
        if captions:
            rec["txt"] = caption
        else:
            rec["label"] = label
        out.append(rec)
    return out


__all__ = ["ImagePreprocess", "ImageClassifier", "TimmClassifier", "image_collate", "image_decoder", "image_preprocess",
           "seeded", "split_normalize", "synthetic_images", "SHAPES"]
