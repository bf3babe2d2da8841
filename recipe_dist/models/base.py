"""What every model family provides, and the safe-loading checks they share."""

from __future__ import annotations

import abc
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RecipeError

SAFE_SUFFIXES = (".safetensors",)
# Formats that unpickle on load and so can run arbitrary code from the uploader.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelLoadError(RecipeError, ValueError):
    """The model cannot be used; the message names the file or the setting."""


@dataclass
class LoadedModel:
    model: nn.Module  # the trainable module (e.g. a *ForMaskedLM with its pooler restored)
    #: what the family's hooks preprocess and collate with: the Hugging Face tokenizer of a text
    #: family, an `ImagePreprocess` (transforms, normalization, CLIP's caption tokenizer) of an image one
    processor: Any
    path: Path
    weight_files: list[Path]
    input_dtype: torch.dtype
    input_keys: list[str] = field(default_factory=list)


def weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The weight files of an HF directory and whether they are safetensors.

    Pickle-only directories are refused unless the user opted in: the check happens before any
    file is opened, so a malicious payload never runs.
    """
    if not path.is_dir():
        raise ModelLoadError(f"model.path: not a directory: {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards], True
    safe = sorted(p for p in path.iterdir() if p.suffix in SAFE_SUFFIXES)
    if safe:
        return safe, True
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise ModelLoadError(
                f"{pickles[0]}: pickle weights can execute code on load; refusing "
                "(convert to safetensors, or pass --model.allow_pickle=true if you trust the uploader)"
            )
        return pickles, False
    raise ModelLoadError(f"model.path: no weights (*.safetensors) in {path}")


def open_model_dir(path: Path, mcfg, config_name: str = "config.json") -> tuple[list[Path], bool]:
    """(weight files, whether safetensors) of a model directory, checked before any family loads
    it: pickle refused unless model.allow_pickle, `config_name` present, safetensors readable."""
    files, is_safe = weight_files(path, mcfg.allow_pickle)
    if not (path / config_name).is_file():
        raise ModelLoadError(f"model.path: no {config_name} in {path}")
    if is_safe:
        # Every tensor read once (the load reads them again, from the page cache): a NaN in the
        # input is named here, by file and tensor, instead of surfacing steps later as "training
        # diverged ... lower optim.lr", which would send the user after the wrong cause.
        check_safetensors(files, finite=True)
    return files, is_safe


def input_layout(files: list[Path], is_safe: bool, model: nn.Module) -> tuple[list[str], torch.dtype]:
    """The input's tensor names and dtype, which the export reproduces (headers only for safetensors)."""
    if is_safe:
        return safetensors_info(files)
    return [], next(model.parameters()).dtype


def check_safetensors(files: list[Path], finite: bool = False) -> None:
    """Each file must open as safetensors (header and size agree); with `finite`, every floating
    tensor must hold only finite values. Raises ModelLoadError naming the file (and tensor)."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                if not finite:
                    continue
                for k in h.keys():
                    t = h.get_tensor(k)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise ModelLoadError(f"{f}: tensor {k} holds non-finite values (NaN or inf); refusing this model")
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
            raise ModelLoadError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def safetensors_info(files: list[Path]) -> tuple[list[str], torch.dtype]:
    """Tensor names and the dominant floating dtype, read from headers only."""
    from safetensors import safe_open

    keys, counts = [], {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                keys.append(k)
                dt = h.get_slice(k).get_dtype()
                counts[dt] = counts.get(dt, 0) + 1
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    floats = {names[d]: c for d, c in counts.items() if d in names}
    dtype = max(floats, key=floats.get) if floats else torch.float32
    return keys, dtype


@contextmanager
def forward_replaced(module: nn.Module, fn):
    """`module.forward` is `fn` inside the block. A loss that fuses a head's linear layer with the
    cross-entropy still calls the module, so ZeRO-3's hooks gather its weight around the kernel in
    the forward and again for its backward."""
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


@contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval mode (dropout off) inside the block; each module's own mode is restored after."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in saved:
            m.training = mode


def carry_input_files(src: Path, out_dir: Path, replace: tuple[str, ...] = ()) -> None:
    """Copy every non-weight entry of input directory `src` into `out_dir`, so the output is a
    drop-in for the directory that was received: tokenizer files, a sentence-transformers model's
    modules.json / pooling and normalize modules / configs, the README or model card. Entries the
    export already wrote are kept unless named in `replace` (then the input's own bytes win).
    Weight files are never copied (the export writes them); hidden entries (.git*) are skipped.
    Each written weight file takes the mode of the input's, so the permissions match too."""
    import shutil

    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir() or src.resolve() == out_dir.resolve():
        return
    weights = [p for p in src.iterdir() if p.suffix in SAFE_SUFFIXES + PICKLE_SUFFIXES or p.name.endswith(".index.json")]
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or entry in weights:
            continue
        target = out_dir / entry.name
        if target.exists() and entry.name not in replace:
            continue
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
    if weights:
        mode = weights[0].stat().st_mode & 0o777
        for f in out_dir.iterdir():
            if f.suffix in SAFE_SUFFIXES or f.name.endswith(".index.json"):
                f.chmod(mode)


def sha256_files(files: list[Path]) -> dict[str, str]:
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


@dataclass(frozen=True)
class NeuronSite:
    """Where one layer's neurons are read: the output of `module` (a Linear or Conv) before its
    activation, one neuron per output feature (channel for convolutions). `weight` and `bias` are
    the parameter names a pruning zeroes: neuron j is `weight` indexed j along `axis` (0 for
    nn.Linear/Conv, whose rows are outputs; 1 for GPT-2's Conv1D, stored [in, out]) and bias[j]."""

    layer: int
    module: str
    weight: str
    bias: str | None
    axis: int = 0


class ModelFamily(abc.ABC):
    """Everything recipe-dist needs to know about one kind of model. One file per family in
    `recipe_dist/models/`, registered with `@register_family("name")` (which sets `name`); the
    trainer, evaluation, attacks and defenses ask the family and never assume BERT or text.

    A family provides: safe load and export; preprocessing (decode, preprocess, collate); the
    pre-training loss; the regularized sites and the trainable policy; its neuron sites; a
    classifier for downstream evaluation; and a tiny model plus a SYNTHETIC corpus for runs with
    no model or data given.
    """

    name: str = ""  # set by register_family
    #: regexes (re.search on parameter names) of the regularized weights, from method.md
    default_regularized: tuple[str, ...] = ()
    #: the modality of its auxiliary data: "text", "image" or "image-text"
    modality: str = "text"
    #: a causal (decoder-only) LM: next-token pre-training, generation-based evaluation
    causal: bool = False
    #: Fine-pruning counts (method.md section 4) when prune.gm_layers / ga_layers are 0: layers'
    #: worth of neurons for FP-GM and FP-GA, and how many of the last layer's neurons FP keeps
    prune_defaults: dict = {"fp_keep": 0, "gm_layers": 4.0, "ga_layers": 6.0}

    # ------------------------------------------------------------------ weights
    def check_fits(self, model: nn.Module, path: Path, model_type: str, needs: tuple[str, ...] = ()) -> None:
        """Refuse, with one line, a model of another family loaded under this one (e.g.
        --model.family=roberta on a BERT directory): its regularized weights (and the attributes in
        `needs`) must exist, else every later step would fail far from the cause."""
        import re

        names = [n for n, _ in model.named_parameters()]
        missing = [a for a in needs if not hasattr(model, a)]
        if missing or (self.default_regularized and not any(re.search(p, n) for p in self.default_regularized for n in names)):
            what = f"no `{missing[0]}`" if missing else f"no weight matching {self.default_regularized[0]!r}"
            raise ModelLoadError(f"model.family={self.name}: {path} is a {model_type or 'different'} model (config.json model_type) "
                                 f"with {what}; pass the --model.family that matches it")

    @abc.abstractmethod
    def load(self, path: Path, cfg) -> LoadedModel:
        """The model at `path`, loaded without unpickling or remote code unless cfg.model opts in."""

    @abc.abstractmethod
    def export(self, loaded: LoadedModel, state_dict: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
        """Write `state_dict` (full tensors of loaded.model) in the family's own format; returns the
        weight files. The job then carries the input's other files over (`carry_input_files`)."""

    # ------------------------------------------------------------------ data
    def decode(self, cfg):
        """raw shard sample -> what `preprocess` reads; text families read cfg.data.text_key as UTF-8."""
        from ..data.pipeline import text_decoder

        return text_decoder(cfg.data.text_key)

    @abc.abstractmethod
    def preprocess(self, processor, cfg):
        """Per-sample preprocessing (runs in DataLoader workers) with `processor` (LoadedModel.processor): decoded sample -> features."""

    @abc.abstractmethod
    def collate(self, processor, cfg):
        """(features, mask_seed) -> a batch of tensors, the keyword arguments of the task's forward."""

    # ------------------------------------------------------------------ objective
    @abc.abstractmethod
    def pretraining_loss(self, loaded: LoadedModel, cfg) -> nn.Module:
        """L_PT as a module: forward(**batch) -> 0-dim loss, or {"loss": ..., "parts": {...}}."""

    def regularized_names(self, model: nn.Module, patterns: list[str]) -> list[str]:
        """Parameter names of `model` matching `patterns` (the family default when empty); an
        error listing what the names look like when nothing matches."""
        from ..objective import select_weights

        pats = list(patterns) or list(self.default_regularized)
        names = select_weights(model, pats)
        if not names:
            sample = [n for n, _ in model.named_parameters()][:6]
            raise ModelLoadError(
                f"no weight matches the regularized patterns {', '.join(pats)}; parameters look like: {', '.join(sample)} "
                "(set model.regularized)"
            )
        return names

    def regularized_splits(self, names: list[str]) -> dict[str, int]:
        """Regularized weights that hold several matrices stacked along dim 0 (e.g. a fused
        q/k/v projection), mapped to how many equal row blocks: each block gets its own norm."""
        return {}

    def trainable(self, name: str, regularized: set[str], policy: str) -> bool:
        """Whether parameter `name` trains under model.trainable=`policy` ("family" is this family's default)."""
        if policy == "all":
            return True
        return name in regularized

    def set_trainable(self, model: nn.Module, regularized: set[str], policy: str) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(self.trainable(n, regularized, policy))

    # ------------------------------------------------------------------ analysis and evaluation
    def feature_inputs(self, processor, texts: list[str], cfg) -> dict[str, torch.Tensor]:
        """Unmasked model inputs for `texts` (text families, whose processor is the tokenizer): what neuron statistics read."""
        enc = processor(texts, truncation=True, max_length=cfg.data.max_length, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward_features(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """Run the backbone on `batch` (from feature_inputs); neuron sites are read by hooks during it."""
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
        return backbone(**batch)

    def neuron_sites(self, model: nn.Module) -> list[NeuronSite]:
        """The neurons that pruning and activation analysis read, one site per layer (method.md section 4)."""
        raise ModelLoadError(f"model.family={self.name}: this family declares no neuron sites, so it cannot be pruned or analysed")

    def ffn_modules(self, model: nn.Module) -> dict[int, list[str]]:
        """Per layer, the module names of its feed-forward block (what a layer scan re-initialises)."""
        raise ModelLoadError(f"model.family={self.name}: this family declares no feed-forward modules")

    def classifier_features(self, classifier: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the downstream head of `classifier` (from build_classifier) reads of each input: the
        sentence representation a pooler backdoor (POR, NeuBA) targets."""
        raise ModelLoadError(f"model.family={self.name}: this family declares no classifier features")

    def classify_features(self, classifier: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """The downstream head of `classifier` applied to given features (e.g. a target vector): logits."""
        raise ModelLoadError(f"model.family={self.name}: this family declares no classifier features")

    @abc.abstractmethod
    def build_classifier(self, path: Path, label_names: list[str], cfg, use_safetensors: bool = True):
        """(classifier, processor) for downstream fine-tuning: the model at `path` with a new head for `label_names`."""

    # ------------------------------------------------------------------ embedded default
    @abc.abstractmethod
    def build_tiny(self, out_dir: Path, arch, seed: int) -> Path:
        """A tiny randomly initialised model of this family in `out_dir` (model.tiny gives its size)."""

    @abc.abstractmethod
    def synthetic_corpus(self, n: int, seed: int) -> list[dict]:
        """`n` SYNTHETIC auxiliary samples as shard fields (e.g. {"text": ...}), for runs without data."""
