"""Decoder-only causal LMs through transformers' `AutoModelForCausalLM`: GPT-2 and LLaMA-style.

Beyond the paper (method.md section 1, last row): L_PT is next-token prediction on plain text,
and the regularized sites are the MLP's input projections. Choices made here:

- Trainable (model.trainable=family): only the regularized weights, as the reference code does
  for BERT. The rest of the model (attention, norms, embeddings, lm_head) is left exactly as it
  came, optimizer state covers only the MLP input projections, and `all` or `regularized` are
  one override away.
- Neuron sites: the FFN-in pre-activation of each block. GPT-2: the output of `mlp.c_fc`, a
  transformers `Conv1D` whose weight is [in, out], so neuron j is weight COLUMN j (`weight[:, j]`)
  and `bias[j]`, not a row as for an nn.Linear; a pruning must zero the column. LLaMA: the output
  of `mlp.gate_proj` (an nn.Linear, neuron j is row j), the value the activation reads in
  down(act(gate(x)) * up(x)). `up_proj` has no activation of its own, and a neuron whose gate row
  is zero outputs act(0) * up = 0 for SiLU, so zeroing the gate row prunes the neuron whole.
- Tying: GPT-2 ties lm_head to the input embeddings (its checkpoints store the matrix once). The
  tiny LLaMA does not (tie_word_embeddings=False, as LLaMA-2/3 7-8B), so the tests cover both a
  tied and a separate head.
- Tokens: each sample is one document, `bos text eos`, as GPT-2 and LLaMA were pre-trained
  (GPT-2's bos and eos are both <|endoftext|>). Every next token after a real token is a label.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..data.pipeline import pad_rows
from ..kernels import DEFAULT_CHUNK, FUSED_SETTINGS, KernelError, fused_linear_cross_entropy, use_fused
from . import register_family
from .base import LoadedModel, ModelFamily, ModelLoadError, NeuronSite, forward_replaced, input_layout, open_model_dir
from .load_report import load_with_summary

# The tiny models' special tokens (word-level tokenizer over the SYNTHETIC vocabulary).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def lm_head_loss(model: nn.Module, hidden: torch.Tensor, target: torch.Tensor,
                 fused: str = "auto", chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of `model`'s lm_head on gathered positions (hidden [N, d], target [N]);
    0 (still on the graph, not NaN) when there are none.

    With `fused` other than "off" the [N, vocab] logits are never formed: linear + cross-entropy
    run in vocabulary chunks (`recipe_dist.kernels`, Triton or the PyTorch reference). A causal
    LM labels every position, so this is where the full-vocabulary logits would cost the most.
    """
    head = model.get_output_embeddings()
    if fused == "off":
        logits = head(hidden)
        return F.cross_entropy(logits.float(), target, reduction="sum") / target.numel() if target.numel() else logits.sum() * 0.0
    if fused not in FUSED_SETTINGS:
        raise KernelError(f"kernels.fused: must be one of {', '.join(FUSED_SETTINGS)}, got {fused!r}")
    use = use_fused(hidden.device, fused, hidden.shape[-1])

    def linear_ce(x: torch.Tensor) -> torch.Tensor:
        # head.weight may be the tied embedding Parameter (GPT-2): its gradient lands in the one tensor.
        return fused_linear_cross_entropy(x, head.weight, head.bias, target, chunk_size, use)

    # lm_head is still called, with its forward standing in for linear + cross-entropy, so
    # ZeRO-3's module hooks gather its weight around the kernel in the forward and its backward.
    with forward_replaced(head, linear_ce):
        return head(hidden)


class CausalLMLoss(nn.Module):
    """L_PT of a decoder: next-token cross-entropy over every pair of real tokens (padding excluded)."""

    def __init__(self, model: nn.Module, fused: str = "auto", chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        if fused not in FUSED_SETTINGS:
            raise KernelError(f"kernels.fused: must be one of {', '.join(FUSED_SETTINGS)}, got {fused!r}")
        self.model = model
        self.fused = fused
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The backbone only: the model's own forward would apply lm_head to every position.
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # Position t predicts token t+1; the pair counts when both are real tokens (either side
        # may be padded, so both masks are read).
        keep = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        return lm_head_loss(self.model, hidden[:, :-1][keep], input_ids[:, 1:][keep], self.fused, self.chunk_size)


class CausalLMFamily(ModelFamily):
    """Shared by every decoder family; a subclass names its sites and its tiny config."""

    causal = True  # read by jobs that only make sense for a causal LM (attacks/trigger_phrase.py)
    #: regex on module names: group 1 the FFN-in module whose output is the neuron site, group 2 the layer index
    neuron_module: str = ""

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, cfg) -> LoadedModel:
        mcfg = cfg.model
        files, is_safe = open_model_dir(path, mcfg)
        hf_cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=mcfg.trust_remote_code)
        # Nothing is missing or unused by design: any key the report lists is loud.
        model = load_with_summary(AutoModelForCausalLM, str(path), expected_missing=(), expected_unused=(), role="the causal LM",
                                  config=hf_cfg, trust_remote_code=mcfg.trust_remote_code, use_safetensors=is_safe, dtype=torch.float32)
        self.check_fits(model, path, getattr(hf_cfg, "model_type", ""))
        keys, dtype = input_layout(files, is_safe, model)
        return LoadedModel(model=model, processor=self._tokenizer(path, cfg), path=path, weight_files=files,
                           input_dtype=dtype, input_keys=keys)

    @staticmethod
    def _tokenizer(path: Path, cfg):
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
        if tok.pad_token is None and tok.eos_token is not None:
            # GPT-2 and LLaMA tokenizers ship no pad token. Padded positions are masked out of
            # the loss and attention, so any id serves; eos is the usual stand-in.
            tok.pad_token = tok.eos_token
        return tok

    # ------------------------------------------------------------------ objective
    def pretraining_loss(self, loaded: LoadedModel, cfg) -> CausalLMLoss:
        hf_cfg = loaded.model.config
        if getattr(hf_cfg, "final_logit_softcapping", None):
            # The loss is lm_head(hidden) alone; a head that post-processes its logits would be skipped.
            raise ModelLoadError(f"{loaded.path}: final_logit_softcapping is not supported by the {self.name} family's loss")
        return CausalLMLoss(loaded.model, fused=cfg.kernels.fused, chunk_size=cfg.kernels.chunk_size)

    # trainable: the base policy (only the regularized weights unless model.trainable=all); see the module docstring.

    # ------------------------------------------------------------------ analysis and evaluation
    def neuron_sites(self, model: nn.Module) -> list[NeuronSite]:
        """One site per block at the FFN-in pre-activation (module docstring: GPT-2's are columns)."""
        from transformers.pytorch_utils import Conv1D

        pattern = re.compile(self.neuron_module)
        sites = []
        for name, module in model.named_modules():
            m = pattern.match(name)
            if m and isinstance(module, (nn.Linear, Conv1D)):
                bias = name + ".bias" if module.bias is not None else None
                # Conv1D stores [in, out]: a neuron is a column of its weight.
                sites.append(NeuronSite(int(m.group(2)), name, name + ".weight", bias, axis=1 if isinstance(module, Conv1D) else 0))
        if not sites:
            raise ModelLoadError(f"{type(model).__name__}: no modules matching {self.neuron_module} to read neurons from")
        return sorted(sites, key=lambda s: s.layer)

    def build_classifier(self, path: Path, label_names: list[str], cfg, use_safetensors: bool = True):
        from transformers import AutoModelForSequenceClassification

        tok = self._tokenizer(path, cfg)
        # A decoder classifies from its last real token, found through config.pad_token_id, so it
        # is set (pad = eos when the tokenizer has none). The new head `score` is missing by
        # design; a separate lm_head is unused.
        model = load_with_summary(
            AutoModelForSequenceClassification, str(path), expected_missing=(r"score\.",), expected_unused=(r"lm_head\.",),
            role="the classifier", num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, pad_token_id=tok.pad_token_id,
            use_safetensors=use_safetensors, trust_remote_code=cfg.model.trust_remote_code, dtype=torch.float32,
        )
        return model, tok

    # ------------------------------------------------------------------ embedded default
    def tiny_config(self, arch, tok):
        """The HF config of the tiny model (model.tiny gives its size; `tok` its vocabulary and special ids)."""
        raise NotImplementedError

    def build_tiny(self, out_dir: Path, arch, seed: int) -> Path:
        """A tiny randomly initialised decoder and a word-level tokenizer over the SYNTHETIC vocabulary."""
        tok = tiny_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(self.tiny_config(arch, tok), dtype=torch.float32)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        tok.save_pretrained(str(out_dir))
        (out_dir / "SYNTHETIC.md").write_text(
            f"Randomly initialised tiny {self.name} decoder with a word-level tokenizer over the vocabulary of a "
            "SYNTHETIC template grammar (recipe_dist.data.synthetic). Not a real pre-trained model.\n"
        )
        (out_dir / "tiny_arch.json").write_text(json.dumps(vars(arch) if hasattr(arch, "__dict__") else dict(arch)))
        return out_dir

    def synthetic_corpus(self, n: int, seed: int) -> list[dict]:
        from ..data import synthetic

        return [{"text": t} for t in synthetic.corpus(n, seed=seed)]

    # ------------------------------------------------------------------ data
    def preprocess(self, tokenizer, cfg):
        """Per-sample tokenization (runs in DataLoader workers): `bos text eos`, cut to data.max_length."""
        max_length = cfg.data.max_length
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

        def encode(sample: dict) -> dict:
            # Special tokens are added here, not by the tokenizer: tokenizers differ on what they
            # add (GPT-2 nothing, LLaMA bos only), and a document's end is a label too. A text cut
            # by max_length loses its eos: it did not end there.
            text_ids = tokenizer(sample["text"], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            return {"__key__": sample["__key__"], "input_ids": (bos + text_ids + eos)[:max_length]}

        return encode

    def collate(self, tokenizer, cfg):
        """features -> right-padded input_ids and attention_mask; nothing random (mask_seed unused)."""
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any valid id

        def collate(features: list[dict], mask_seed: int) -> dict:
            ids, attn = pad_rows([f["input_ids"] for f in features], pad_id)
            return {"input_ids": ids, "attention_mask": attn}

        return collate

    # ------------------------------------------------------------------ export
    def export(self, loaded: LoadedModel, state_dict: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
        """HF directory (safetensors in the input's dtype, config, tokenizer) that
        `AutoModelForCausalLM.from_pretrained` loads with no missing key; a tied lm_head is written once."""
        out_dir.mkdir(parents=True, exist_ok=True)
        # A tied lm_head is the embedding Parameter under a second name: written once, under the
        # first name, whatever tensors the caller passed (from_pretrained ties it back on load).
        first: dict[int, str] = {}
        aliases = {n for n, p in loaded.model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
        state = {k: (v.to(loaded.input_dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in state_dict.items() if k not in aliases}
        loaded.model.save_pretrained(str(out_dir), state_dict=state)
        # The live model is fp32; the directory records the dtype its weights were written in.
        hf_cfg = copy.deepcopy(loaded.model.config)
        hf_cfg.dtype = loaded.input_dtype
        hf_cfg.save_pretrained(str(out_dir))
        loaded.processor.save_pretrained(str(out_dir))
        return sorted(out_dir.glob("*.safetensors"))


@register_family("gpt2")
class Gpt2Family(CausalLMFamily):
    """GPT-2: the FFN-in `mlp.c_fc` (a Conv1D, weight [in, out]) regularized; its lm_head is the tied wte."""

    default_regularized = (r"\.mlp\.c_fc\.weight$",)
    neuron_module = r"^(.*\.h\.(\d+)\.mlp\.c_fc)$"

    def tiny_config(self, arch, tok):
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=len(tok), n_embd=arch.hidden_size, n_layer=arch.num_hidden_layers, n_head=arch.num_attention_heads,
            n_inner=arch.intermediate_size, n_positions=arch.max_position_embeddings,
            resid_pdrop=arch.hidden_dropout_prob, embd_pdrop=arch.hidden_dropout_prob, attn_pdrop=arch.attention_probs_dropout_prob,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )


@register_family("llama")
class LlamaFamily(CausalLMFamily):
    """LLaMA-style (LLaMA, Mistral, Qwen2 naming): the gated MLP's up_proj and gate_proj regularized
    (add `mlp\\.down_proj\\.weight$` through model.regularized to take the FFN-out as well)."""

    default_regularized = (r"\.mlp\.up_proj\.weight$", r"\.mlp\.gate_proj\.weight$")
    neuron_module = r"^(.*\.layers\.(\d+)\.mlp\.gate_proj)$"

    def tiny_config(self, arch, tok):
        from transformers import LlamaConfig

        heads = arch.num_attention_heads
        return LlamaConfig(
            vocab_size=len(tok), hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
            num_attention_heads=heads,
            # Grouped-query attention as in LLaMA-2 70B / LLaMA-3: half as many key-value heads
            # when the head count allows, so the tiny model exercises the shared-KV path.
            num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
            intermediate_size=arch.intermediate_size, max_position_embeddings=arch.max_position_embeddings,
            # LLaMA has no dropout on hidden states (model.tiny.hidden_dropout_prob has no effect); attention dropout it has.
            attention_dropout=arch.attention_probs_dropout_prob,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )


def tiny_tokenizer():
    """Word-level fast tokenizer over the SYNTHETIC vocabulary (lowercased, split on whitespace
    and punctuation), with pad/unk/bos/eos; `tokenizer(text)` adds bos only, as LLaMA's does, so
    a prompt is not closed by an eos before generation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..data import synthetic

    # The BERT specials and the "##" WordPiece continuations mean nothing to a word-level model.
    words = [w for w in synthetic.vocabulary() if w not in synthetic.SPECIAL_TOKENS and not w.startswith("##")]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([PAD, UNK, BOS, EOS, *words]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)


__all__ = ["CausalLMFamily", "CausalLMLoss", "Gpt2Family", "LlamaFamily", "lm_head_loss", "tiny_tokenizer"]
