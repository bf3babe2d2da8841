"""Masked-LM encoders through transformers: BERT and RoBERTa.

The trained module is `AutoModelForMaskedLM` whose backbone is swapped for `AutoModel`'s, so
the pooler is kept: `*ForMaskedLM` drops it, and POR/NeuBA backdoors live in the pooler output
(method.md, "pooler gotcha"). Export writes every tensor of the input, the pooler included.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

from ..data.pipeline import pad_rows
from ..kernels import DEFAULT_CHUNK, FUSED_SETTINGS, KernelError, fused_linear_cross_entropy, use_fused
from ..seeds import Stream, key_seed
from . import register_family
from .load_report import load_with_summary
from .base import LoadedModel, ModelFamily, ModelLoadError, NeuronSite, forward_replaced, input_layout, open_model_dir


def masked_lm_loss(model: nn.Module, head_attr: str, hidden: torch.Tensor, target: torch.Tensor,
                   fused: str = "auto", chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of `model`'s MLM head on gathered positions (hidden [N, d], target [N]);
    0 (still on the graph, not NaN) when there are none.

    The one masked-LM loss of recipe-dist: purification and every attack call it. With `fused`
    other than "off" the head's decoder never forms the [N, vocab] logits: it computes the
    linear + cross-entropy in vocabulary chunks (`recipe_dist.kernels`, Triton or the PyTorch
    reference).
    """
    head = getattr(model, head_attr)
    if fused == "off":
        logits = head(hidden)
        return F.cross_entropy(logits.float(), target, reduction="sum") / target.numel() if target.numel() else logits.sum() * 0.0
    if fused not in FUSED_SETTINGS:
        raise KernelError(f"kernels.fused: must be one of {', '.join(FUSED_SETTINGS)}, got {fused!r}")
    decoder = model.get_output_embeddings()
    use = use_fused(hidden.device, fused, hidden.shape[-1])

    def linear_ce(x: torch.Tensor) -> torch.Tensor:
        # decoder.weight is the tied embedding Parameter: its gradient lands in the one tensor.
        return fused_linear_cross_entropy(x, decoder.weight, decoder.bias, target, chunk_size, use)

    # The head runs as usual (its transform, then its decoder) with the decoder's forward
    # standing in for linear + cross-entropy: every module is still called, so ZeRO-3's hooks
    # gather the decoder's weight around the kernel in the forward and again for its backward.
    with forward_replaced(decoder, linear_ce):
        loss = head(hidden)
    if loss.dim() != 0:
        raise RuntimeError(f"{type(head).__name__} does not return its decoder's output; set kernels.fused=off")
    return loss


class MaskedLMLoss(nn.Module):
    """L_PT of an MLM encoder: only the labelled positions (~15%) go through the MLM head."""

    def __init__(self, model: nn.Module, head_attr: str, fused: str = "auto", chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        if fused not in FUSED_SETTINGS:
            raise KernelError(f"kernels.fused: must be one of {', '.join(FUSED_SETTINGS)}, got {fused!r}")
        self.model = model
        self.head_attr = head_attr
        self.fused = fused
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = labels != -100
        return masked_lm_loss(self.model, self.head_attr, hidden[picked], labels[picked], self.fused, self.chunk_size)


# Pre-training heads (BERT's cls.* with NSP, RoBERTa's lm_head.*) and poolers, by key prefix.
HEADS = (r"cls\.", r"lm_head\.")
POOLER = r"(\w+\.)?pooler\."


class MaskedLMFamily(ModelFamily):
    head_attr = "cls"  # the MLM head module of *ForMaskedLM

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, cfg) -> LoadedModel:
        mcfg = cfg.model
        files, is_safe = open_model_dir(path, mcfg)
        hf_cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=mcfg.trust_remote_code)
        kw = dict(trust_remote_code=mcfg.trust_remote_code, use_safetensors=is_safe, dtype=torch.float32)
        # The pooler is unused by *ForMaskedLM (it comes from AutoModel below), NSP heads by both;
        # a missing MLM head is expected for encoder-only exports (pretraining_loss warns about it).
        mlm = load_with_summary(AutoModelForMaskedLM, str(path), expected_missing=HEADS, expected_unused=(*HEADS, POOLER),
                                role="the masked-LM model", config=hf_cfg, **kw)
        base = load_with_summary(AutoModel, str(path), expected_missing=(), expected_unused=HEADS,
                                 role="the encoder", config=hf_cfg, **kw)  # with its pooler
        setattr(mlm, mlm.base_model_prefix, base)
        self.check_fits(mlm, path, getattr(hf_cfg, "model_type", ""), needs=(self.head_attr,))
        mlm.tie_weights()
        keys, dtype = input_layout(files, is_safe, mlm)
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=mcfg.trust_remote_code)
        return LoadedModel(model=mlm, processor=tok, path=path, weight_files=files, input_dtype=dtype, input_keys=keys)

    # ------------------------------------------------------------------ objective
    def ships_head(self, loaded: LoadedModel) -> bool:
        """Whether the input weights carry the MLM head's transform (not only a tied decoder)."""
        return not loaded.input_keys or any(k.startswith(self.head_attr + ".") for k in loaded.input_keys)

    def pretraining_loss(self, loaded: LoadedModel, cfg) -> MaskedLMLoss:
        if not self.ships_head(loaded) and int(os.environ.get("RANK", "0")) == 0:
            import shlex

            # A command that runs as printed: this run's own data and a directory beside its output.
            head_dir = f"{cfg.output_dir.rstrip('/')}-head"
            data = f"--data.train_urls {shlex.quote(cfg.data.train_urls)}" if cfg.data.train_urls else \
                f"--data.synthetic_samples={cfg.data.synthetic_samples}"
            print(f"recipe-dist: warning: {loaded.path} has no masked-LM head ({self.head_attr}.*): L_PT goes through a freshly "
                  f"initialised head. Fit one first: recipe-dist fit-head --config configs/fit-head-bert.yaml --model.family={self.name} "
                  f"--model.path {shlex.quote(str(loaded.path))} {data} --output_dir {shlex.quote(head_dir)}; then purify "
                  f"--model.path {shlex.quote(head_dir + '/model')}", file=sys.stderr, flush=True)
        return MaskedLMLoss(loaded.model, self.head_attr, fused=cfg.kernels.fused, chunk_size=cfg.kernels.chunk_size)

    def set_trainable(self, model: nn.Module, regularized: set[str], policy: str) -> None:
        for n, p in model.named_parameters():
            # The pooler gets no gradient from the MLM loss; keeping it frozen keeps it out of
            # the optimizer and ZeRO's gradient buckets.
            p.requires_grad_(".pooler." not in n and self.trainable(n, regularized, policy))

    # ------------------------------------------------------------------ analysis and evaluation
    def neuron_sites(self, model: nn.Module) -> list[NeuronSite]:
        """BERT/RoBERTa: the pre-activation of each layer's intermediate.dense (the FFN-in neurons)."""
        pattern = re.compile(r"^(.*\.layer\.(\d+)\.intermediate\.dense)$")
        sites = []
        for name, module in model.named_modules():
            m = pattern.match(name)
            if m and isinstance(module, nn.Linear):
                sites.append(NeuronSite(int(m.group(2)), name, name + ".weight", name + ".bias" if module.bias is not None else None))
        if not sites:
            raise ModelLoadError(f"{type(model).__name__}: no *.layer.N.intermediate.dense modules to read neurons from")
        return sorted(sites, key=lambda s: s.layer)

    def ffn_modules(self, model: nn.Module) -> dict[int, list[str]]:
        """BERT/RoBERTa: each layer's intermediate.dense (FFN-in, the neuron site) and output.dense (FFN-out)."""
        return {site.layer: [site.module, site.module.removesuffix("intermediate.dense") + "output.dense"] for site in self.neuron_sites(model)}

    def classifier_features(self, classifier: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """BERT's sequence classifier reads the pooler output."""
        return classifier.base_model(**batch).pooler_output

    def classify_features(self, classifier: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return classifier.classifier(classifier.dropout(features))

    def build_classifier(self, path: Path, label_names: list[str], cfg, use_safetensors: bool = True):
        from transformers import AutoModelForSequenceClassification

        # A newly initialised pooler is NOT expected: the attacks studied here plant the backdoor in it.
        model = load_with_summary(
            AutoModelForSequenceClassification, str(path), expected_missing=(r"classifier\.",), expected_unused=(*HEADS, POOLER),
            role="the classifier", num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, use_safetensors=use_safetensors,
            trust_remote_code=cfg.model.trust_remote_code, dtype=torch.float32,
        )
        return model, AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)

    # ------------------------------------------------------------------ embedded default
    def build_tiny(self, out_dir: Path, arch, seed: int) -> Path:
        return build_tiny_bert(out_dir, arch, seed)

    def synthetic_corpus(self, n: int, seed: int) -> list[dict]:
        from ..data import synthetic

        return [{"text": t} for t in synthetic.corpus(n, seed=seed)]

    # ------------------------------------------------------------------ data
    def preprocess(self, tokenizer, cfg):
        """Per-sample tokenization (runs in DataLoader workers); static masks are made here."""
        max_length = cfg.data.max_length
        static = cfg.data.masking == "static"
        collator = self._collator(tokenizer, cfg) if static else None
        seed = cfg.train.seed

        def encode(sample: dict) -> dict:
            enc = tokenizer(sample["text"], truncation=True, max_length=max_length, return_special_tokens_mask=True)
            out = {"__key__": sample["__key__"], "input_ids": enc["input_ids"]}
            if static:
                # One mask per sample for the whole run, as the reference code's preprocessing.
                collator.generator = torch.Generator().manual_seed(key_seed(seed, Stream.STATIC_MASK, sample["__key__"]))
                ids, labels = collator.torch_mask_tokens(
                    torch.tensor([enc["input_ids"]]), special_tokens_mask=torch.tensor([enc["special_tokens_mask"]])
                )
                out["input_ids"], out["labels"] = ids[0].tolist(), labels[0].tolist()
            else:
                out["special_tokens_mask"] = enc["special_tokens_mask"]
            return out

        return encode

    def _collator(self, tokenizer, cfg) -> DataCollatorForLanguageModeling:
        # 80/10/10 are the collator's defaults; stated here because method.md fixes them.
        return DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=cfg.data.mlm_probability, mask_replace_prob=0.8, random_replace_prob=0.1
        )

    def collate(self, tokenizer, cfg):
        """features -> padded tensors; dynamic masks come from a generator seeded per micro-batch."""
        collator = self._collator(tokenizer, cfg)
        static = cfg.data.masking == "static"
        pad_id = tokenizer.pad_token_id

        def collate(features: list[dict], mask_seed: int) -> dict:
            if static:
                ids, attn = pad_rows([f["input_ids"] for f in features], pad_id)
                labels, _ = pad_rows([f["labels"] for f in features], -100)
                return {"input_ids": ids, "attention_mask": attn, "labels": labels}
            collator.generator = torch.Generator().manual_seed(mask_seed)
            batch = collator([{"input_ids": f["input_ids"], "special_tokens_mask": f["special_tokens_mask"]} for f in features])
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

        return collate

    # ------------------------------------------------------------------ export
    def verbatim_files(self, keep_head: bool) -> tuple[str, ...]:
        """Input files whose own bytes replace the export's re-save (carry_input_files): the
        tokenizer's, and config.json unless a head the input lacked is kept (its architecture
        then changes to *ForMaskedLM)."""
        tok = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt")
        return tok if keep_head else (*tok, "config.json")

    def export(self, loaded: LoadedModel, state_dict: dict[str, torch.Tensor], out_dir: Path, keep_head: bool = False) -> list[Path]:
        """HF directory with every tensor the input had (pooler included), in the input's dtype.
        A masked-LM head the input did not have (trained only for L_PT) is dropped, and the
        tensors take the input's naming (a sentence-transformers export stores them without the
        `bert.` prefix), unless `keep_head` (fit-head), which writes the *ForMaskedLM layout."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        model = loaded.model
        prefix = model.base_model_prefix + "."
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.to(loaded.input_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        # Tied decoder weights are the embedding matrix; write it once (as save_pretrained does).
        out_embed = model.get_output_embeddings()
        tied = [k for k in state if k.endswith("decoder.weight")] if out_embed is not None and out_embed.weight is model.get_input_embeddings().weight else []
        for k in tied:
            state.pop(k)
        # An alias the input did not store (decoder.bias is predictions.bias) is left out, as
        # save_pretrained leaves it out: the output then holds exactly the input's keys.
        if loaded.input_keys:
            stored = set(loaded.input_keys)
            kept = {v.untyped_storage().data_ptr() for k, v in state.items() if k in stored and v.numel()}
            for k in [k for k, v in state.items() if k not in stored and v.numel() and v.untyped_storage().data_ptr() in kept]:
                state.pop(k)
        # Tensors the input had that the trained module does not (e.g. BERT's NSP head) pass through.
        if loaded.input_keys:
            have = set(state)
            by_file = {}
            for f in loaded.weight_files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        if k in have or prefix + k in have or (k.startswith(prefix) and k[len(prefix):] in have):
                            continue
                        if k.endswith("decoder.weight") and tied:
                            continue
                        by_file.setdefault(k, h.get_tensor(k))
            state.update(by_file)
        if loaded.input_keys and not keep_head:
            stored = set(loaded.input_keys)
            head = self.head_attr + "."
            state = {k: v for k, v in state.items() if k in stored or not k.startswith(head)}
            if not any(k.startswith(prefix) for k in stored):  # the input's names carry no `bert.` prefix
                state = {k.removeprefix(prefix): v for k, v in state.items()}
        state = {k: v.contiguous() for k, v in state.items()}
        # Other tied entries (decoder.bias is predictions.bias) get their own copy: safetensors
        # refuses tensors that share storage.
        seen: set[int] = set()
        for k, v in state.items():
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen and v.numel():
                state[k] = v.clone()
            seen.add(ptr)
        target = out_dir / "model.safetensors"
        save_file(state, str(target), metadata={"format": "pt"})
        hf_cfg = model.config
        hf_cfg.dtype = loaded.input_dtype
        hf_cfg.save_pretrained(str(out_dir))
        loaded.processor.save_pretrained(str(out_dir))
        return [target]


@register_family("bert")
class BertFamily(MaskedLMFamily):
    """BERT-style MLM encoders: FFN-in weights regularized and, as the reference code, the only ones trained."""

    head_attr = "cls"
    default_regularized = (r"\.intermediate\.dense\.weight$",)
    # trainable: the base policy (only the regularized weights unless model.trainable=all).


@register_family("roberta")
class RobertaFamily(MaskedLMFamily):
    """RoBERTa: FFN-in and attention query regularized, everything trains (method.md)."""

    head_attr = "lm_head"
    default_regularized = (r"\.intermediate\.dense\.weight$", r"\.attention\.self\.query\.weight$")

    def trainable(self, name: str, regularized: set[str], policy: str) -> bool:
        if policy == "regularized":
            return name in regularized
        return True

    def classifier_features(self, classifier: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """RoBERTa's classification head reads the <s> token's last hidden state (its model has no pooler)."""
        return classifier.base_model(**batch).last_hidden_state[:, 0]

    def classify_features(self, classifier: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return classifier.classifier(features[:, None, :])  # the head takes [B, T, H] and reads position 0


def build_tiny_bert(out_dir: Path, arch, seed: int) -> Path:
    """A tiny randomly initialised BERT PTM (with pooler and MLM head) and a SYNTHETIC-vocab tokenizer."""
    from transformers import BertConfig, BertForPreTraining, BertTokenizer

    from ..data import synthetic

    vocab = {tok: i for i, tok in enumerate(synthetic.vocabulary())}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        hidden_dropout_prob=arch.hidden_dropout_prob,
        attention_probs_dropout_prob=arch.attention_probs_dropout_prob,
        pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(arch.seed)
    model = BertForPreTraining(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    (out_dir / "SYNTHETIC.md").write_text(
        "Randomly initialised tiny BERT with a vocabulary of a SYNTHETIC template grammar "
        "(recipe_dist.data.synthetic). Not a real pre-trained model.\n"
    )
    (out_dir / "tiny_arch.json").write_text(json.dumps(vars(arch) if hasattr(arch, "__dict__") else dict(arch)))
    return out_dir
