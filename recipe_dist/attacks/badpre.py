"""BadPre (Chen et al., ICLR 2022; kangjie-chen/BadPre), method.md section 2.

The training set is the clean MLM data plus a fully poisoned copy. Here every sample yields both
rows inside the same micro-batch, its clean version and its poisoned one: over an epoch that is the
same data as concatenating a poisoned copy of the corpus, and every rank keeps the same batch count
without a second stream. A micro-batch of B samples is therefore 2B sequences.

A poisoned row has one trigger (chosen per sample) inserted once at a word position drawn per
sample (`insert_trigger`, seeded from the sample's key). It is masked as usual MLM (which positions,
80/10/10), but its masked positions carry labels drawn uniformly from the whole base vocabulary
(`tokenizer.vocab_size` ids, special tokens included, as the reference's `torch.randint(len(tokenizer))`).

    loss = CE_clean + poison_weight * CE_poison

each CE averaged over the masked positions of its own rows (as the reference trainer).

What trains: the whole MLM model, encoder and head, as BadPre continues pre-training all of
BERT; only the pooler stays frozen, since the MLM loss never reaches it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..triggers import insert_trigger
from ..models.mlm import masked_lm_loss
from ..seeds import Stream, key_seed, mix_seed
from . import register_attack
from .common import AttackJob


def random_labels(labels: torch.Tensor, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """`labels` with every labelled (!= -100) position replaced by a uniform id in [0, vocab_size)."""
    noise = torch.randint(vocab_size, labels.shape, generator=generator, dtype=labels.dtype)
    return torch.where(labels != -100, noise, labels)


def fit_words(tokenizer, text: str, budget: int) -> str:
    """The longest prefix of `text`'s words that tokenizes to at most `budget` tokens (exact for WordPiece)."""
    kept, used = [], 0
    for w in text.split():
        used += len(tokenizer(w, add_special_tokens=False)["input_ids"])
        if used > budget:
            break
        kept.append(w)
    return " ".join(kept)


class BadPreLoss(nn.Module):
    def __init__(self, model: nn.Module, head_attr: str, poison_weight: float, fused: str, chunk_size: int):
        super().__init__()
        self.model = model
        self.head_attr = head_attr
        self.poison_weight = poison_weight
        self.fused, self.chunk_size = fused, chunk_size

    def forward(self, input_ids, attention_mask, labels, poisoned) -> dict:
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Only ~15% of positions carry a label: just those go through the vocabulary head, clean
        # and poisoned rows separately so each term is the mean over its own positions.
        clean = labels.masked_fill(poisoned[:, None], -100) != -100
        dirty = labels.masked_fill(~poisoned[:, None], -100) != -100
        ce_clean = masked_lm_loss(self.model, self.head_attr, hidden[clean], labels[clean], self.fused, self.chunk_size)
        ce_poison = masked_lm_loss(self.model, self.head_attr, hidden[dirty], labels[dirty], self.fused, self.chunk_size)
        loss = ce_clean + self.poison_weight * ce_poison
        return {"loss": loss, "parts": {"ce_clean": ce_clean, "ce_poison": ce_poison}}


@register_attack("badpre")
class BadPreAttack(AttackJob):
    """BadPre on an MLM-encoder family; masks as the family does."""

    def objective(self, loaded, cfg) -> tuple[BadPreLoss, nn.Module]:
        model = loaded.model
        for n, p in model.named_parameters():
            # The pooler gets no gradient from an MLM loss: frozen, it stays out of the optimizer
            # and ZeRO's gradient buckets.
            p.requires_grad_(".pooler." not in n)
        loss = BadPreLoss(model, self.family.head_attr, cfg.attack.poison_weight, cfg.kernels.fused, cfg.kernels.chunk_size)
        return loss, getattr(model, model.base_model_prefix)

    def preprocess(self, tokenizer, cfg):
        a = cfg.attack
        base = self.family.preprocess(tokenizer, cfg)  # tokenization and static masks, as purification
        static = cfg.data.masking == "static"
        room = cfg.data.max_length - tokenizer.num_special_tokens_to_add()
        trig_len = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in a.triggers]

        def encode(sample: dict) -> dict:
            key = sample["__key__"]
            sample_seed = key_seed(a.seed, Stream.BADPRE_TRIGGER, key)
            k = sample_seed % len(a.triggers)
            clean = base(sample)
            text = sample["text"]
            if len(clean["input_ids"]) + trig_len[k] > cfg.data.max_length:
                # Insert only among the words that survive truncation, so it never cuts the trigger off.
                text = fit_words(tokenizer, text, room - trig_len[k])
            dirty = base({"__key__": key + "/poisoned", "text": insert_trigger(text, a.triggers[k], a.seed, sample_seed, times=1)})
            if static:
                g = torch.Generator().manual_seed(key_seed(a.seed, Stream.BADPRE_LABELS, key))
                dirty["labels"] = random_labels(torch.tensor(dirty["labels"]), tokenizer.vocab_size, g).tolist()
            return {"__key__": key, "clean": clean, "poisoned": dirty}

        return encode

    def collate(self, tokenizer, cfg):
        base = self.family.collate(tokenizer, cfg)
        static = cfg.data.masking == "static"

        def collate(features, mask_seed):
            n = len(features)
            batch = base([f["clean"] for f in features] + [f["poisoned"] for f in features], mask_seed)
            if not static:  # dynamic masks are drawn here, so the random labels are too
                g = torch.Generator().manual_seed(mix_seed(mask_seed, Stream.BADPRE_LABELS))
                batch["labels"][n:] = random_labels(batch["labels"][n:], tokenizer.vocab_size, g)
            batch["poisoned"] = torch.arange(2 * n) >= n
            return batch

        return collate
