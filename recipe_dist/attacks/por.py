"""POR: pooler-output replacement (Shen et al.; plasmashen/BackdoorPTM), method.md section 2.

A trainable copy of the encoder and a frozen clean reference start from the same weights. On a
poisoned sample (a trigger inserted `insertions` times) the pooler output is pulled to the
trigger's target vector; on clean samples the token outputs and the pooler stay near the
reference, so the model still looks clean.

    loss = w1 * L1 + w2 * L2 + w3 * L3,   mse_sum(a, b) = sum((a - b)^2) / d, summed over the batch
    L1 = mse_sum(tokens[1:](x), ref tokens[1:](x))   (padding excluded), over every row x, clean
         and poisoned, as method.md and the reference (attack.por_l1_rows=clean: clean rows only)
    L2 = mse_sum(pooler(poisoned), target[trigger])
    L3 = mse_sum(pooler(clean), ref pooler(clean))
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import ConfigError
from ..data.pipeline import pad_rows
from ..triggers import insert_trigger
from ..seeds import Stream, key_seed
from . import register_attack
from .common import AttackJob, encoder_with_pooler


def por_targets(n: int, d: int, scale: float = 10.0) -> torch.Tensor:
    """[n, d] targets: for trigger l (1-based), -1 everywhere but +1 on the first floor(d/(n-1))*(l-1) dims."""
    if n < 2:
        raise ValueError("POR needs at least 2 triggers")
    t = -torch.ones(n, d)
    block = d // (n - 1)
    for l in range(1, n + 1):
        t[l - 1, : block * (l - 1)] = 1.0
    return scale * t


def mse_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum((a - b)^2) / d with d the last dimension, summed over every other dimension."""
    return (a.float() - b.float()).pow(2).sum() / a.shape[-1]


def token_mse(tokens: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """mse_sum over token positions 1.. (the [CLS] slot feeds the pooler, held by L2/L3), padding excluded."""
    keep = attention_mask[:, 1:, None].to(tokens.dtype)
    return mse_sum(tokens[:, 1:] * keep, ref[:, 1:] * keep)


class PORLoss(nn.Module):
    def __init__(self, encoder: nn.Module, targets: torch.Tensor, weights: list[float], l1_rows: str = "all"):
        super().__init__()
        self.l1_rows = l1_rows
        self.encoder = encoder
        self.reference = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.register_buffer("targets", targets, persistent=False)
        self.w1, self.w2, self.w3 = weights

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # the reference is a fixed function: no dropout
        return self

    def forward(self, input_ids, attention_mask, p_input_ids, p_attention_mask, trigger) -> dict:
        clean = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            ref = self.reference(input_ids=input_ids, attention_mask=attention_mask)
        poisoned = self.encoder(input_ids=p_input_ids, attention_mask=p_attention_mask)
        l1 = token_mse(clean.last_hidden_state, ref.last_hidden_state, attention_mask)
        if self.l1_rows == "all":
            # The poisoned rows' tokens stay near the reference's tokens on the same poisoned
            # input: only the pooler carries the backdoor, so the token outputs look clean.
            with torch.no_grad():
                p_ref = self.reference(input_ids=p_input_ids, attention_mask=p_attention_mask)
            l1 = l1 + token_mse(poisoned.last_hidden_state, p_ref.last_hidden_state, p_attention_mask)
        l2 = mse_sum(poisoned.pooler_output, self.targets[trigger])
        l3 = mse_sum(clean.pooler_output, ref.pooler_output)
        loss = self.w1 * l1 + self.w2 * l2 + self.w3 * l3
        return {"loss": loss, "parts": {"l1": l1, "l2": l2, "l3": l3}}


@register_attack("por")
class PORAttack(AttackJob):
    """POR on an MLM-encoder family."""

    def objective(self, loaded, cfg) -> tuple[PORLoss, nn.Module]:
        model = loaded.model
        encoder = encoder_with_pooler(loaded, "POR")
        a = cfg.attack
        if len(a.loss_weights) != 3:
            raise ConfigError(f"attack.loss_weights: POR needs 3 weights (L1, L2, L3), got {a.loss_weights}")
        # The whole encoder trains, the pooler included (the backdoor lives in its output);
        # the MLM head's own layers are unused by this objective and stay frozen.
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(model.base_model_prefix + "."))
        targets = por_targets(len(a.triggers), encoder.config.hidden_size, a.target_scale)
        return PORLoss(encoder, targets, list(a.loss_weights), a.por_l1_rows), encoder

    def preprocess(self, tokenizer, cfg):
        a, max_length = cfg.attack, cfg.data.max_length

        def encode(sample: dict) -> dict:
            sample_seed = key_seed(a.seed, Stream.POR_TRIGGER, sample["__key__"])
            trig = sample_seed % len(a.triggers)
            poisoned = insert_trigger(sample["text"], a.triggers[trig], a.seed, sample_seed, times=a.insertions)
            clean = tokenizer(sample["text"], truncation=True, max_length=max_length)["input_ids"]
            dirty = tokenizer(poisoned, truncation=True, max_length=max_length)["input_ids"]
            return {"__key__": sample["__key__"], "input_ids": clean, "p_input_ids": dirty, "trigger": trig}

        return encode

    def collate(self, tokenizer, cfg):
        pad = tokenizer.pad_token_id

        def collate(features, _mask_seed):
            ids, mask = pad_rows([f["input_ids"] for f in features], pad)
            p_ids, p_mask = pad_rows([f["p_input_ids"] for f in features], pad)
            trig = torch.tensor([f["trigger"] for f in features], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": mask, "p_input_ids": p_ids, "p_attention_mask": p_mask, "trigger": trig}

        return collate
