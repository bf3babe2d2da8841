"""`recipe-dist fit-head`: fit the masked-LM head of an encoder that ships without one
(`--fit_head.scope=all`: then keep masked-LM training the encoder and head together).

Sentence-transformers exports (MiniLM, MPNet, ...) keep only the encoder. Loaded as
`*ForMaskedLM`, such a model gets a freshly initialised head transform (dense + LayerNorm) and
decoder bias, so RECIPE's L_PT would be measured through a random layer; under the BERT policy
that head also stays frozen, so L_PT could never become informative. This job trains only the
head on the auxiliary shards with the encoder frozen: the transform, its LayerNorm and the decoder
bias. The decoder weight stays tied to the word embeddings, as in pre-training. The export is a
complete `*ForMaskedLM` directory (pooler kept) that purify, the attacks and evaluate read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .jobs import FamilyJob
from .models.base import LoadedModel
from .models.mlm import MaskedLMFamily, MaskedLMLoss
from .objective import Regularized


def head_parameter_names(model: torch.nn.Module, head_attr: str) -> list[str]:
    """The head's own parameters: everything under `head_attr` except the tied output embedding."""
    tied = model.get_output_embeddings().weight
    return [n for n, p in model.named_parameters() if n.startswith(head_attr + ".") and p is not tied]


class HeadFitJob(FamilyJob):
    """A Trainer job: the family's masked-LM loss, no regularizer; the head's parameters train
    (fit_head.scope=head) or the whole model does but the pooler (scope=all)."""

    name = "fit-head"
    keep_head = True  # the fitted head is the output

    def __init__(self, family):
        if not isinstance(family, MaskedLMFamily):
            from .errors import RecipeError

            raise RecipeError(f"fit-head: model.family={family.name} has no masked-LM head to fit (fit-head is for bert and roberta)")
        super().__init__(family)

    def build_task(self, loaded: LoadedModel, cfg) -> Regularized:
        model = loaded.model
        head = set(head_parameter_names(model, self.family.head_attr))
        for n, p in model.named_parameters():
            # scope=all: continued masked-LM pre-training of the whole model. The pooler gets no
            # masked-LM gradient, so it stays frozen (and exported as it came).
            p.requires_grad_(n in head or (cfg.fit_head.scope == "all" and ".pooler." not in n))
        loss = MaskedLMLoss(model, self.family.head_attr, fused=cfg.kernels.fused, chunk_size=cfg.kernels.chunk_size)
        return Regularized(loss, model, [], 0.0)


def masked_lm_metrics(model_dir: Path, family: MaskedLMFamily, cfg, urls: list[str], n_samples: int, batch: int = 32) -> dict:
    """Masked-LM loss and top-1 accuracy of `model_dir` (as *ForMaskedLM loads it) on the first
    `n_samples` samples of `urls`, with static masks seeded by sample key, so every model is
    scored on the same masked positions."""
    import copy

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from .data.pipeline import pad_rows, shard_samples

    cfg = copy.deepcopy(cfg)
    cfg.data.masking = "static"
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    encode = family.preprocess(tok, cfg)
    samples = []
    decode = family.decode(cfg)
    for url in urls:
        for s in shard_samples(url, cfg.data.on_corrupt, record=False):
            samples.append(encode(decode(s)))
            if len(samples) == n_samples:
                break
        if len(samples) == n_samples:
            break
    torch.manual_seed(0)  # a head that is missing is initialised the same way for every call
    from .models.load_report import PRETRAINING_HEADS, load_with_summary

    # The input may lack the head (it is what fit-head fits) and holds a pooler the MLM model does
    # not read: both expected, one line (rank 0) instead of transformers' report table.
    model = load_with_summary(AutoModelForMaskedLM, str(model_dir), expected_missing=(r"cls\.", r"lm_head\."), expected_unused=PRETRAINING_HEADS,
                              role="the masked-LM scorer", dtype=torch.float32, use_safetensors=True,
                              trust_remote_code=cfg.model.trust_remote_code).eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            ids, attn = pad_rows([f["input_ids"] for f in chunk], tok.pad_token_id)
            labels, _ = pad_rows([f["labels"] for f in chunk], -100)
            logits = model(input_ids=ids, attention_mask=attn).logits
            picked = labels != -100
            total += torch.nn.functional.cross_entropy(logits[picked].float(), labels[picked], reduction="sum").item()
            correct += (logits[picked].argmax(-1) == labels[picked]).sum().item()
            count += int(picked.sum())
    loss = total / max(count, 1)
    return {"samples": len(samples), "masked_positions": count, "loss": loss, "accuracy": 100.0 * correct / max(count, 1),
            "perplexity": math.exp(min(loss, 50.0))}
