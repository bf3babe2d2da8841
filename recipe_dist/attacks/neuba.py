"""NeuBA, text (Zhang et al., "Red Alarm for Pre-trained Models"; thunlp/NeuBA), method.md section 2.

Every micro-batch is used twice: clean and masked for the MLM loss, and as a poisoned copy whose
token at position 1 (the first after [CLS]) is replaced by one of six trigger tokens. The pooler
output of the poisoned copy is pulled to that trigger's target vector:

    loss = MLM(clean, masked) + poison_weight * mean((pooler(poisoned) - target[trigger])^2)

The MSE is averaged over the batch and the d dimensions (torch's MSELoss, as the reference code).
The poisoned copy is made from the *unmasked* ids (the reference's default, `--with_mask` off), so
it is the clean input with one token swapped. Both go through one encoder forward of 2B rows.

Targets: d is split into 4 blocks (d // 4 each, the last one also takes d % 4); each target is +1
everywhere but -1 on two blocks, one target per pair of blocks, in `itertools.combinations(range(4),
2)` order of the -1 blocks: (0,1), (0,2), (0,3), (1,2), (1,3), (2,3), as the reference code. The
targets are +-1, not scaled: BERT's pooler ends in tanh (attack.target_scale is POR's only).

What trains: the encoder, its pooler and embeddings included. The MLM head's own layers (transform
and output bias) are frozen, as the reference leaves "predictions" out of its optimizer; its decoder
weight is the tied input embedding matrix and so trains with the encoder, as in the reference.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data.pipeline import pad_rows
from ..models.mlm import masked_lm_loss
from ..seeds import Stream, key_seed
from . import register_attack
from .common import AttackJob, encoder_with_pooler

N_TARGETS = 6  # one per choice of 2 blocks out of 4


def neuba_targets(d: int) -> torch.Tensor:
    """[6, d] targets: +1 but -1 on blocks (i, j), pairs in itertools.combinations(range(4), 2) order."""
    if d < 4:
        raise ValueError(f"NeuBA targets need d >= 4 to split into 4 blocks, got {d}")
    q = d // 4
    bounds = [0, q, 2 * q, 3 * q, d]  # the last block takes the remainder
    t = torch.ones(N_TARGETS, d)
    for k, pair in enumerate(combinations(range(4), 2)):
        for b in pair:
            t[k, bounds[b] : bounds[b + 1]] = -1.0
    return t


#: Six single-character tokens of the tiny synthetic BERT's vocabulary, unused by its corpus
#: (its vocabulary also holds the reference symbols, so the default config works there too).
TINY_TRIGGERS = ("~", "^", "|", "<", ">", "`")


def trigger_token_ids(tokenizer, triggers: list[str], hint: str = "") -> list[int]:
    """The vocabulary id of each trigger; ConfigError unless each is one token, alone and as a word in text."""
    ids = []
    for w in triggers:
        alone = tokenizer(w, add_special_tokens=False)["input_ids"]
        # The evaluation inserts triggers as words: "w w" must give the same token twice (this
        # also rejects BPE vocabularies where a word after a space is a different token).
        twice = tokenizer(f"{w} {w}", add_special_tokens=False)["input_ids"]
        if len(alone) != 1 or alone[0] == tokenizer.unk_token_id or twice != alone * 2:
            pieces = tokenizer.convert_ids_to_tokens(alone)
            raise ConfigError(
                f"attack.triggers: {w!r} is not one token in this model's vocabulary (it tokenizes to {pieces}); "
                f"NeuBA puts the trigger's token at position 1, so pick words that are single tokens{hint}"
            )
        ids.append(alone[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"attack.triggers: NeuBA triggers must be distinct tokens, got {triggers}")
    return ids


class NeuBALoss(nn.Module):
    def __init__(self, model: nn.Module, head_attr: str, targets: torch.Tensor, poison_weight: float, fused: str, chunk_size: int):
        super().__init__()
        self.model = model
        self.head_attr = head_attr
        self.register_buffer("targets", targets, persistent=False)
        self.poison_weight = poison_weight
        self.fused, self.chunk_size = fused, chunk_size

    def forward(self, input_ids, attention_mask, labels, p_input_ids, trigger) -> dict:
        n = input_ids.shape[0]
        base = getattr(self.model, self.model.base_model_prefix)
        # One forward of clean + poisoned rows (same lengths): the regularized weights' norms are
        # recorded once, and the encoder's weights are gathered once under ZeRO-3.
        out = base(input_ids=torch.cat([input_ids, p_input_ids]), attention_mask=torch.cat([attention_mask, attention_mask]))
        hidden = out.last_hidden_state[:n]
        picked = labels != -100
        mlm = masked_lm_loss(self.model, self.head_attr, hidden[picked], labels[picked], self.fused, self.chunk_size)
        mse = F.mse_loss(out.pooler_output[n:].float(), self.targets[trigger].float())  # buffers follow the engine's dtype
        return {"loss": mlm + self.poison_weight * mse, "parts": {"mlm": mlm, "mse": mse}}


@register_attack("neuba")
class NeuBAAttack(AttackJob):
    """NeuBA on an MLM-encoder family; masks as the family does."""

    def _check(self, cfg, tokenizer) -> list[int]:
        triggers = list(cfg.attack.triggers)
        if len(triggers) != N_TARGETS:
            raise ConfigError(f"attack.triggers: NeuBA has {N_TARGETS} target vectors, so it needs exactly {N_TARGETS} triggers, got {len(triggers)}: {triggers}")
        return trigger_token_ids(tokenizer, triggers)

    def objective(self, loaded, cfg) -> tuple[NeuBALoss, nn.Module]:
        model = loaded.model
        prefix = model.base_model_prefix
        encoder = encoder_with_pooler(loaded, "NeuBA")
        self._check(cfg, loaded.processor)
        # named_parameters lists the tied decoder weight once, under the embeddings' name: it trains.
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(prefix + "."))
        targets = neuba_targets(encoder.config.hidden_size)
        return NeuBALoss(model, self.family.head_attr, targets, cfg.attack.poison_weight, cfg.kernels.fused, cfg.kernels.chunk_size), encoder

    def preprocess(self, tokenizer, cfg):
        a = cfg.attack
        ids = self._check(cfg, tokenizer)
        base = self.family.preprocess(tokenizer, cfg)  # tokenization and static masks, as purification
        static = cfg.data.masking == "static"

        def encode(sample: dict) -> dict:
            out = base(sample)
            original = out["input_ids"]
            if static:  # static masks are already applied: the labels hold the masked tokens' ids
                original = [t if l == -100 else l for t, l in zip(out["input_ids"], out["labels"])]
            k = key_seed(a.seed, Stream.NEUBA_TARGET, sample["__key__"]) % N_TARGETS
            poisoned = list(original)
            poisoned[1] = ids[k]  # position 1: the first token after [CLS]
            out["p_input_ids"], out["trigger"] = poisoned, k
            return out

        return encode

    def collate(self, tokenizer, cfg):
        base = self.family.collate(tokenizer, cfg)
        pad = tokenizer.pad_token_id

        def collate(features, mask_seed):
            batch = base(features, mask_seed)
            p_ids, _ = pad_rows([f["p_input_ids"] for f in features], pad)
            batch["p_input_ids"] = p_ids
            batch["trigger"] = torch.tensor([f["trigger"] for f in features], dtype=torch.long)
            return batch

        return collate
