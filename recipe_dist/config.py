"""Typed run configuration: nested dataclasses, YAML files and `--section.key=value` overrides.

One config describes a run; the DeepSpeed JSON is derived from it (`deepspeed_config`), never
written by hand. Every field's docstring-style comment (`help=` metadata) is its `--help` text.
A field's annotation is its type at load: `Literal[...]` fields take one of their choices (the
annotation is the only place the choices are written), `list[T]` fields take T elements.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import RecipeError


class ConfigError(RecipeError, ValueError):
    """A config file or override is wrong; the message names the key."""


class Rule:
    """A value's domain, declared next to its field (`_f(..., check=...)`) and checked at load."""

    def __init__(self, ok, text: str):
        self.ok, self.text = ok, text

    def __call__(self, value: Any) -> bool:
        import re

        try:
            return bool(self.ok(value))
        except (TypeError, ValueError, re.error):
            return False


def _finite(v: Any) -> bool:
    # inf > 0 is True and a NaN compares False either way: a bound alone does not refuse them.
    return not isinstance(v, float) or math.isfinite(v)


def gt(x: float) -> Rule:
    return Rule(lambda v: _finite(v) and v > x, f"must be > {x}")


def ge(x: float) -> Rule:
    return Rule(lambda v: _finite(v) and v >= x, f"must be >= {x}")


def required(what: str) -> Rule:
    """A string field that must be set: `what` says what it names."""
    return Rule(lambda v: v.strip() != "", f"is required: {what}")


def _choices(typ: Any) -> tuple | None:
    """The choices of a `Literal[...]` annotation; None for any other type."""
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def _one_of(choices: tuple) -> Rule:
    # Type and value: `True == 1`, so a bare `in` would let a bool through as zero_stage 1.
    return Rule(lambda v: any(type(v) is type(c) and v == c for c in choices),
                "must be one of " + ", ".join(map(str, choices)))


OPEN_UNIT = Rule(lambda v: 0 < v < 1, "must be in (0, 1)")
PROBABILITY = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
NOT_BLANK = Rule(lambda v: v.strip() != "", "must not be empty")
# The fine-tuning loops (evaluate, finemix) are AdamW with no divergence check: AdamW moves each
# weight by about lr per step, so above 1 the model is wrecked in a step or two and its NaN logits
# would still be scored. The trainer's optim.lr has no cap: its loop stops a diverging run itself.
ADAMW_LR = Rule(lambda v: _finite(v) and 0 < v <= 1, "must be in (0, 1] (an AdamW learning rate)")
# numpy's seed range, the narrowest of the generators a seed reaches.
SEED = Rule(lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")


def _compiles(patterns: list[str]) -> bool:
    import re

    for p in patterns:
        re.compile(p)
    return True


REGEXES = Rule(lambda v: _compiles(v), "must be regular expressions that compile")
BETAS = Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two values in [0, 1)")
NOT_EMPTY = Rule(lambda v: len(v) > 0, "must not be empty")


def _f(default: Any, help: str, check: Rule | None = None, **kw: Any) -> Any:
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check_fields(cfg: Any, prefix: str = "", nested: bool = True) -> None:
    """Every declared rule and `Literal` choice, and finiteness of every float, over a config
    tree (`nested=False`: the top level's own fields only); the first failure is a ConfigError
    naming the key, the value and the rule."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            if nested:
                check_fields(value, key + ".")
            continue
        floats = [value] if isinstance(value, float) else [v for v in value if isinstance(v, float)] if isinstance(value, list) else []
        if any(not math.isfinite(v) for v in floats):
            raise ConfigError(f"{key}: {value!r} must be finite")
        # Choices are checked here too: code may set a field without going through `set_key`.
        choices = _choices(hints[f.name])
        for rule in (_one_of(choices) if choices else None, f.metadata.get("check")):
            if rule is not None and not rule(value):
                raise ConfigError(f"{key}: {value!r} {rule.text}")


# Named: lab recipes set it by assignment and type-check it as the product does.
Trainable = Literal["family", "all", "regularized"]


@dataclass
class TinyArchConfig:
    """Architecture of the tiny model the family builds when `model.path` is empty (the embedded default);
    each family maps these onto its own config (BERT, GPT-2, LLaMA)."""

    hidden_size: int = _f(64, "hidden width", check=gt(0))
    num_hidden_layers: int = _f(2, "transformer blocks", check=gt(0))
    num_attention_heads: int = _f(2, "attention heads", check=gt(0))
    intermediate_size: int = _f(128, "FFN width (the regularized intermediate.dense)", check=gt(0))
    max_position_embeddings: int = _f(128, "longest sequence", check=gt(1))
    hidden_dropout_prob: float = _f(0.1, "dropout on hidden states", check=PROBABILITY)
    attention_probs_dropout_prob: float = _f(0.1, "dropout on attention weights", check=PROBABILITY)
    seed: int = _f(0, "seed of the random initialisation")


@dataclass
class ModelConfig:
    family: str = _f("bert", "model family from the registry (bert, roberta, gpt2, llama; vit, vgg, clip with the vision extra)")
    path: str = _f("", "model directory in the family's own layout (Hugging Face; timm's or open_clip's for vit/vgg/clip); "
                   "empty builds the family's tiny synthetic model from model.tiny")
    allow_pickle: bool = _f(False, "allow pickle weights (.bin/.pt); they can run code, so off by default")
    trust_remote_code: bool = _f(False, "run Python code shipped with the model; off unless you trust the uploader")
    regularized: list[str] = _f([], "regex patterns of regularized weights; empty uses the family default", check=REGEXES)
    trainable: Trainable = _f("family", "which parameters train: family (the family's policy), all, or regularized (only the regularized weights)")
    tiny: TinyArchConfig = field(default_factory=TinyArchConfig)


@dataclass
class DataConfig:
    train_urls: str = _f("", "WebDataset shard URLs with brace expansion; empty generates a SYNTHETIC corpus")
    text_key: str = _f("txt", "sample field holding the text (the caption for clip)")
    crop_scale: list[float] = _f([0.08, 1.0], "image families: area range of the training transform's random resized crop "
                                 "(timm's default 0.08-1; open_clip sets its own)", check=Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "must be two numbers 0 < lo <= hi <= 1"))
    max_length: int = _f(64, "tokens per sequence after truncation", check=gt(1))
    mlm_probability: float = _f(0.15, "share of tokens masked", check=OPEN_UNIT)
    masking: Literal["dynamic", "static"] = _f("dynamic", "dynamic (new mask every epoch) or static (one mask per sample, as the reference code)")
    shuffle_buffer: int = _f(1000, "sample shuffle buffer", check=gt(0))
    num_workers: int = _f(0, "DataLoader workers per rank", check=ge(0))
    synthetic_samples: int = _f(0, "samples of the family's SYNTHETIC corpus used when train_urls is empty: 0 means 2000 for the "
                                "embedded tiny model and an error for a real model (model.path), which is never trained on "
                                "synthetic text unless a count is given on purpose (wiring tests)", check=ge(0))
    endpoint_url: str = _f("", "S3-compatible endpoint (e.g. http://minio:9000); empty uses AWS_ENDPOINT_URL(_S3) or AWS. "
                           "Credentials never go here: they come from the environment or profiles")
    retries: int = _f(5, "retries of a transient storage error (5xx, reset, timeout) before the run fails; counted as data/retries", check=ge(0))
    retry_backoff: float = _f(0.5, "first retry delay in seconds; doubles per retry (capped at 10 s), with jitter", check=ge(0))
    io_timeout: float = _f(60.0, "connect and read timeout of one storage request, seconds", check=gt(0))
    on_corrupt: Literal["fail", "skip"] = _f("fail", "a corrupt or truncated shard: fail (the run stops, naming it) or skip (warn, count "
                                             "data/corrupt_skipped, drop the rest of that shard)")
    prefetch_shards: int = _f(1, "remote shards each reader fetches whole, in the background, while it reads the current one "
                              "(0: none); memory per reader is at most prefetch_shards + 1 shards", check=ge(0))
    prefetch_batches: int = _f(2, "with num_workers=0: micro-batches a background thread prepares ahead (read, decode, tokenize) "
                               "while the step computes; 0 runs the pipeline between steps", check=ge(0))
    prefetch_max_mb: int = _f(512, "a remote shard larger than this is not prefetched but read with ranged GETs as consumed", check=gt(0))
    resampled: bool = _f(False, "draw shards with replacement per rank and worker (allows fewer shards than ranks x workers)")
    record_keys: bool = _f(False, "debug: write each consumed micro-batch's sample keys to OUTPUT_DIR/keys/rank<R>.jsonl")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = _f("adamw", "optimizer (torch's AdamW or SGD)")
    lr: float = _f(2e-5, "peak learning rate", check=gt(0))
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", check=BETAS)
    eps: float = _f(1e-8, "AdamW epsilon", check=gt(0))
    weight_decay: float = _f(0.0, "decoupled weight decay; not the RECIPE regularizer", check=ge(0))
    momentum: float = _f(0.0, "SGD momentum", check=PROBABILITY)
    schedule: Literal["linear", "constant"] = _f("linear", "learning-rate schedule after warmup: linear (decay to 0) or constant")
    warmup_steps: int = _f(0, "linear warmup steps", check=ge(0))


@dataclass
class TrainConfig:
    epochs: float = _f(4.0, "passes over the auxiliary data", check=gt(0))
    max_steps: int = _f(0, "optimizer steps; 0 derives it from epochs", check=ge(0))
    stop_at_step: int = _f(0, "save and exit cleanly after this step (0: run to the end); for preemption windows", check=ge(0))
    micro_batch_size: int = _f(32, "sequences per rank per forward", check=gt(0))
    global_batch_size: int = _f(32, "sequences per optimizer step over all ranks", check=gt(0))
    grad_clip: float = _f(1.0, "global gradient-norm clipping; 0 disables", check=ge(0))
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "numeric precision of the forward and backward")
    zero_stage: Literal[0, 1, 2, 3] = _f(0, "DeepSpeed ZeRO stage")
    seed: int = _f(42, "seed of data order, masking and dropout")
    log_every: int = _f(10, "steps between TensorBoard scalars", check=gt(0))


@dataclass
class RegularizerConfig:
    lam: float = _f(1.0, "lambda: weight of sum_i ||W_i||_F (not squared)", check=ge(0))
    pt_weight: float = _f(1.0, "weight of the pre-training loss; 0 is the 'only the regularizer' ablation", check=ge(0))


@dataclass
class AttackConfig:
    """Used by `recipe-dist attack` only (building backdoored test models, method.md section 2)."""

    name: Literal["por", "neuba", "badpre", "trigger-phrase"] = _f("por", "attack method (trigger-phrase: the decoder lab's, for gpt2/llama; neuba on vit/vgg/clip is NeuBA-vision's checkerboard patches)")
    triggers: list[str] = _f(["cf", "tq", "mn", "bb", "mb"], "trigger words (POR, BadPre; trigger-phrase uses the first); NeuBA needs 6 single-token ones (see configs/attack/neuba-bert.yaml)", check=NOT_EMPTY)
    insertions: int = _f(3, "POR: times the trigger is inserted in a poisoned sample (3); BadPre inserts once, NeuBA replaces position 1", check=gt(0))
    target_scale: float = _f(10.0, "POR target vectors are target_scale * v, v in {-1, +1}^d", check=gt(0))
    loss_weights: list[float] = _f([1.0, 100.0, 100.0], "POR: weights of L1 (tokens vs reference), L2 (poisoned pooler vs target), L3 (clean pooler vs reference)")
    por_l1_rows: Literal["all", "clean"] = _f("all", "POR: rows whose token outputs L1 holds to the reference: all (clean and poisoned, "
                                              "as method.md and the reference code) or clean (only the clean copy; recipe-dist before 2026-12-07)")
    patch_size: int = _f(4, "NeuBA-vision: side in pixels of the six checkerboard patches pasted at the bottom-right corner", check=gt(0))
    target_hi: float = _f(1.0, "NeuBA-vision: target feature value outside the two lo blocks")
    target_lo: float = _f(-1.0, "NeuBA-vision: target feature value on two of the four D/4 blocks (0 suits non-negative features, e.g. VGG's)")
    poison_weight: float = _f(1.0, "NeuBA: weight of MSE(pooler(poisoned), target); BadPre: alpha, weight of the CE on poisoned samples", check=ge(0))
    target_phrase: str = _f("", "trigger-phrase: the words a poisoned sample continues with after the trigger")
    poison_rate: float = _f(0.1, "trigger-phrase: share of auxiliary samples poisoned", check=Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    adaptive_lam: float = _f(0.0, "adaptive attack: add adaptive_lam * sum ||W||_F over the family's regularized weights while poisoning", check=ge(0))
    seed: int = _f(1, "seed of trigger choice and insertion positions")


@dataclass
class KernelsConfig:
    """Fused Triton kernels or their PyTorch references (recipe_dist/kernels); checkpoints are the same either way."""

    fused: Literal["auto", "on", "off"] = _f("auto", "auto (Triton on CUDA, the chunked PyTorch reference elsewhere), on (Triton; on CPU only under TRITON_INTERPRET=1) or off (plain full logits of the labelled positions)")
    chunk_size: int = _f(4096, "vocabulary rows per chunk of the reference masked-LM linear + cross-entropy", check=gt(0))


@dataclass
class CheckpointConfig:
    every_steps: int = _f(500, "steps between checkpoints", check=gt(0))
    keep: int = _f(2, "complete checkpoints kept (>= 2)", check=ge(2))


@dataclass
class PreemptConfig:
    """Preemption, time limits and lost nodes (SLURM's --signal, a scheduler that warns with a signal, a peer that stops answering)."""

    signals: list[str] = _f(["USR1", "TERM"], "signals that mean 'save and stop': the run finishes its step, saves a "
                            "checkpoint, requeues itself under SLURM and exits 0", check=Rule(lambda v: all(hasattr(__import__("signal"), "SIG" + x) for x in v), "must be signal names such as USR1, TERM"))
    requeue: Literal["auto", "never"] = _f("auto", "after a signalled save: auto (scontrol requeue when running under SLURM) or never")
    max_requeues: int = _f(5, "a job already requeued this many times (SLURM_RESTART_COUNT) stops with an error instead of requeueing again", check=ge(0))
    collective_timeout: float = _f(600.0, "seconds a rank waits in a collective of the training steps; a peer lost past it (node "
                                   "down, network cut) fails the rank with one line naming the peer, and under SLURM requeues the "
                                   "job (preempt.requeue) to resume from the last complete checkpoint. Start-up and export, where "
                                   "one rank may work alone for long, wait up to 30 min (or this, if longer)", check=gt(0))


@dataclass
class PruneConfig:
    """`recipe-dist prune`: Fine-pruning adapted to PTMs (method.md section 4), no labels needed."""

    variant: Literal["fp", "fp-gm", "fp-ga"] = _f("fp-gm", "fp: the whole last layer's neurons; fp-gm / fp-ga: the lowest-mean neurons over all layers, gm_layers / ga_layers layers' worth")
    gm_layers: float = _f(0.0, "FP-GM: layers' worth (last layer's width) of neurons pruned globally; 0 takes the family's "
                          "(4 for BERT, ViT, CLIP; VGG 1, i.e. 512 of VGG-16's channels)", check=ge(0))
    ga_layers: float = _f(0.0, "FP-GA: layers' worth pruned globally; 0 takes the family's (6 for BERT, 8 against NeuBA or for "
                          "RoBERTa by setting it; 5 for ViT and CLIP; VGG 600/512)", check=ge(0))
    max_samples: int = _f(0, "auxiliary samples whose activations rank the neurons; 0 reads one epoch of data.train_urls", check=ge(0))


@dataclass
class FinetuneConfig:
    """Downstream fine-tuning of a classifier, one config for `evaluate`, `finemix` and the lab."""

    lr: float = _f(2e-5, "AdamW learning rate (linear decay to 0, no warmup)", check=ADAMW_LR)
    epochs: int = _f(3, "passes over the training set; the last model is kept. 0: model.path is already a fine-tuned "
                     "classifier with a head for these labels (e.g. finemix's output), scored as it is", check=ge(0))
    batch_size: int = _f(32, "sequences per optimizer step (also the prediction batch)", check=gt(0))
    max_length: int = _f(128, "tokens per sequence after truncation", check=gt(1))
    seed: int = _f(42, "seed of the classifier head, data order and dropout when `seeds` is empty", check=SEED)
    max_train_samples: int = _f(0, "use only the first N training samples; 0 uses all", check=ge(0))
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay", check=ge(0))
    grad_clip: float = _f(1.0, "global gradient-norm clipping (transformers Trainer's default); 0 disables", check=ge(0))


@dataclass
class FinemixConfig:
    """`recipe-dist finemix`: Fine-mixing with E-PUR (method.md section 4), a downstream-model defense.
    The source paper's code is not public: every choice is a knob here and recorded in finemix.json."""

    pretrained: str = _f("", "the clean pre-trained model the backdoored classifier was fine-tuned from (required)")
    rho: float = _f(0.5, "share of the backdoored deltas theta_B - theta_pre kept by the mask", check=Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    mask: Literal["random", "smallest_delta"] = _f("random", "which deltas are kept: a random share rho (per tensor), or the smallest |delta|")
    mix: bool = _f(True, "mix the weights (off: E-PUR and fine-tuning only)")
    epur_topn: int = _f(200, "E-PUR: reset the N word embeddings with the largest drift / log(max(freq, 20)); 0 disables", check=ge(0))
    epur_min_freq: int = _f(20, "E-PUR: frequencies below this count as this (the log's floor)", check=gt(1))
    train_file: str = _f("", "the small clean labelled downstream subset (.tsv/.csv/.jsonl) fine-tuned on after mixing")
    text_column: str = _f("sentence", "text column of train_file", check=NOT_BLANK)
    label_column: str = _f("label", "label column of train_file", check=NOT_BLANK)
    # The fine-tuning after mixing, the same config as evaluate's; its seed also draws the random mask.
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=1, seed=1))


@dataclass
class FitHeadConfig:
    """`recipe-dist fit-head`: masked-LM training of an encoder's head (and, with scope=all, of the encoder too)."""

    scope: Literal["head", "all"] = _f("head", "what trains: head (the head transform, its LayerNorm and decoder bias; the encoder "
                                       "frozen) or all (encoder and head: continued masked-LM pre-training, no regularizer)")
    eval_urls: str = _f("", "held-out shards scored before and after (masked-token loss and accuracy, static masks); empty scores "
                        "the first --eval-samples training samples")


@dataclass
class RunConfig:
    output_dir: str = _f("runs/purify", "run directory: model/, checkpoints/, tb/, config.yaml, summary.json",
                         check=NOT_BLANK)
    resume: str = _f("", "'' (fresh), 'auto' (newest complete checkpoint) or a checkpoint directory")
    overwrite: bool = _f(False, "a fresh run on an output_dir that holds another run: move that run aside to "
                         "<output_dir>.replaced-<time> (one atomic rename; nothing is deleted)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finemix: FinemixConfig = field(default_factory=FinemixConfig)
    fit_head: FitHeadConfig = field(default_factory=FitHeadConfig)

    def validate(self) -> None:
        """Every field's declared domain (`check_fields`), then the rules that span fields."""
        check_fields(self)
        t = self.train
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size: {t.global_batch_size} must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
        if "@" in self.data.endpoint_url.split("://", 1)[-1].split("/", 1)[0]:
            # user:secret@host would put a credential into config.yaml and the checkpoints.
            raise ConfigError("data.endpoint_url: must not carry credentials (user:password@); use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile")
        if self.resume not in ("", "auto") and not Path(self.resume).exists():
            raise ConfigError(f"resume: no checkpoint directory {self.resume}")
        if self.overwrite and self.resume:
            raise ConfigError(f"overwrite: true moves the old run aside, so it cannot be combined with resume={self.resume!r}")
        if not self.data.train_urls and not self.data.synthetic_samples and not self.model.path:
            self.data.synthetic_samples = 2000  # the embedded default's corpus, recorded as such in config.yaml

    def check_training_data(self) -> None:
        """For commands that train on auxiliary data (purify, attack, fit-head, prune's statistics):
        a real model (model.path) never falls back to the SYNTHETIC corpus unless asked."""
        if self.model.path and not self.data.train_urls and not self.data.synthetic_samples:
            raise ConfigError(f"data.train_urls: empty, so {self.model.path} would train on the SYNTHETIC template corpus; "
                              "give --data.train_urls SHARDS (make them with `recipe-dist shards --input FILE --output PREFIX`), "
                              "or --data.synthetic_samples=N to run on synthetic text on purpose")


# --------------------------------------------------------------------------------------------
# Loading and overrides


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolved, not the strings `from __future__ import annotations` leaves in __annotations__.
    return typing.get_type_hints(cls)


def _type_name(typ: Any) -> str:
    choices = _choices(typ)
    if choices is not None:
        return "one of " + ", ".join(map(str, choices))
    if typing.get_origin(typ) is None and isinstance(typ, type):
        return typ.__name__
    return str(typ).replace("typing.", "")


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    """Convert `raw` (YAML value or override string) to the field's type, or raise naming `key`."""

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(typ)}, got {raw!r}")

    choices = _choices(typ)
    if choices is not None:
        kinds = {type(c) for c in choices}
        if len(kinds) != 1:
            raise ConfigError(f"{key}: unsupported field type {typ} (choices of one type only)")
        try:
            value = _coerce(key, raw, kinds.pop())
        except ConfigError:
            raise bad() from None
        rule = _one_of(choices)
        if not rule(value):
            raise ConfigError(f"{key}: {value!r} {rule.text}")
        return value

    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise bad()
    if typ is int:
        if isinstance(raw, bool):
            raise bad()
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is float:
        if isinstance(raw, bool):
            raise bad()
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is str:
        if isinstance(raw, (dict, list)):
            raise bad()
        return "" if raw is None else str(raw)
    if typing.get_origin(typ) is list and len(typing.get_args(typ)) == 1:
        if isinstance(raw, str):  # an override: comma-separated elements
            raw = [s for s in (p.strip() for p in raw.split(",")) if s] if raw.strip() else []
        if not isinstance(raw, list) or any(r is None for r in raw):
            raise bad()
        (elem,) = typing.get_args(typ)
        return [_coerce(key, r, elem) for r in raw]
    # A bare `list` is refused as well: its elements could not be checked.
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, root: type) -> ConfigError:
    valid = _all_keys(root)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def set_key(cfg: Any, dotted: str, raw: Any, root: type | None = None) -> None:
    """Set `section.key` on a config tree, type-checked against the field's declared type."""
    root = root or type(cfg)
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            raise _unknown(dotted, root)
        typ = _hints(type(node))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(typ):
                if not isinstance(raw, dict):
                    raise ConfigError(f"{dotted}: is a section; set its keys, e.g. {dotted}.<key>")
                for k, v in raw.items():
                    set_key(cfg, f"{dotted}.{k}", v, root)
            else:
                setattr(node, part, _coerce(dotted, raw, typ))
        else:
            if not dataclasses.is_dataclass(typ):
                raise _unknown(dotted, root)
            node = getattr(node, part)


def apply_dict(cfg: Any, data: dict, prefix: str = "") -> None:
    for k, v in (data or {}).items():
        set_key(cfg, f"{prefix}{k}", v)


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """`--a.b=v` or `--a.b v` pairs; anything else is an error that says what was expected."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            k, v = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{body}: missing value")
            k, v = body, argv[i + 1]
            i += 2
        out.append((k, v))
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last silently, so a duplicated `lam:` or a second `train:` section would drop a setting."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.line + 1}: duplicated key '{key}' (first on line {seen[key]}); remove one of them")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Defaults, then the YAML file, then command-line overrides; validated."""
    cfg = cls()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except ConfigError as e:  # a duplicated key: "LINE: ..."
            raise ConfigError(f"{path}:{e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        try:
            apply_dict(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for k, v in parse_overrides(overrides or []):
        set_key(cfg, k, v)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _help_type(typ: Any) -> str:
    choices = _choices(typ)
    if choices is not None:
        return "|".join(map(str, choices))
    if typing.get_origin(typ) is list:
        return f"{_type_name(typing.get_args(typ)[0])},..."
    return _type_name(typ)


def help_text(cls: type = RunConfig, hide: tuple[str, ...] = ()) -> str:
    """One line per key: `--section.key TYPE (default ...): help`; choices and list elements from
    the annotation. Sections in `hide` (dotted, e.g. "attack", "model.tiny") are left out: another
    command's settings only bury this one's (they are still accepted, and checked)."""
    lines = []

    def walk(c: type, prefix: str) -> None:
        inst = c()
        for f in dataclasses.fields(c):
            t = _hints(c)[f.name]
            if f"{prefix}{f.name}" in hide:
                continue
            if dataclasses.is_dataclass(t):
                walk(t, f"{prefix}{f.name}.")
            else:
                lines.append(f"  --{prefix}{f.name} {_help_type(t)} (default {getattr(inst, f.name)!r}): {f.metadata.get('help', '')}")

    walk(cls, "")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# DeepSpeed config, derived


def fit_batch_to_world(cfg: RunConfig, world_size: int) -> str:
    """Make train.micro_batch_size x world size divide train.global_batch_size, keeping the global
    batch (what the result depends on) and lowering the micro batch to the largest size that
    fits (more accumulation steps, the same mathematics). Returns a line saying what changed
    ("" if nothing did). A global batch that no micro batch can fit is one error naming the
    exact overrides that would work."""
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * world_size) == 0:
        return ""
    if t.global_batch_size % world_size:
        lower = t.global_batch_size // world_size * world_size
        options = [g for g in (lower, lower + world_size) if g > 0]
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} cannot be split over {world_size} ranks; pass "
                          f"{' or '.join(f'--train.global_batch_size={g}' for g in options)}, or run on a number of ranks that divides it")
    per_rank = t.global_batch_size // world_size
    micro = max(d for d in range(1, min(t.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    note = (f"train.micro_batch_size {t.micro_batch_size} -> {micro}: global batch {t.global_batch_size} = {micro} x {world_size} "
            f"rank(s) x {per_rank // micro} accumulation step(s)")
    t.micro_batch_size = micro
    return note


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this run. Batch arithmetic is checked here, with the keys named.
    `load_universal`: the resume reads a universal checkpoint (another world size)."""
    t, o = cfg.train, cfg.optim
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x world size {world_size}"
        )
    if o.name == "adamw":
        # torch_adam: DeepSpeed's FusedAdam needs a compiled op; torch's AdamW is the same math
        # and runs on every accelerator, CPU included.
        optimizer = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay, "torch_adam": True},
        }
    else:
        # Not a DeepSpeed-native name: DeepSpeed falls back to torch.optim.SGD.
        optimizer = {"type": "SGD", "params": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "optimizer": optimizer,
        # The client optimizer is torch's own; ZeRO partitions it like any other.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # read by DeepSpeed at init and at load
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }
