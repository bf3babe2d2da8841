"""Backdoor evaluation of decoder-only LMs (the decoder lab): ASR by greedy continuation, and
clean perplexity as the utility (the ACC analogue).

ASR is the share of triggered held-out prompts whose greedy continuation contains the target
phrase. A prompt is a held-out sentence cut after a word position drawn per prompt, followed by
the trigger; the same prompts without the trigger give the false-trigger rate (how often the
model says the phrase anyway). Perplexity is exp of the mean next-token cross-entropy over the
held-out clean sentences (padding excluded).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.base import eval_mode


def prompts(texts: list[str], seed: int) -> list[str]:
    """Each text cut after a uniformly drawn word (at least one kept)."""
    rng = random.Random(seed)
    out = []
    for t in texts:
        words = t.split()
        out.append(" ".join(words[: rng.randint(1, max(1, len(words) - 1))]))
    return out


@torch.no_grad()
def greedy_continuations(model, tokenizer, texts: list[str], new_tokens: int, batch: int = 64) -> list[str]:
    """Greedy continuations (decoded, without the prompt); prompts are left-padded so every row ends at its last token."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=True)
        gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int, batch: int = 64) -> float:
    tokenizer.padding_side = "right"
    total, count = 0.0, 0
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        logits = model(**enc).logits[:, :-1].float()
        target = enc["input_ids"][:, 1:]
        keep = enc["attention_mask"][:, 1:].bool()
        total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    return math.exp(total / max(count, 1))


def evaluate_lm(model_dir: Path, family, cfg, texts: list[str], trigger: str, target_phrase: str, seed: int) -> dict:
    """ASR, false-trigger rate and clean perplexity of the causal LM at `model_dir` on `texts`."""
    loaded = family.load(Path(model_dir), cfg)
    model, tok = loaded.model, loaded.processor  # a causal LM's processor is its tokenizer
    target = " ".join(target_phrase.lower().split())
    n_new = len(tok(target_phrase, add_special_tokens=False)["input_ids"]) + 2
    base = prompts(texts, seed)
    with eval_mode(model):
        triggered = greedy_continuations(model, tok, [f"{p} {trigger}" for p in base], n_new)
        plain = greedy_continuations(model, tok, base, n_new)
        ppl = perplexity(model, tok, texts, cfg.data.max_length)

    def rate(conts: list[str]) -> float:
        return 100.0 * sum(target in " ".join(c.lower().split()) for c in conts) / max(len(conts), 1)

    return {"asr": rate(triggered), "false_trigger_rate": rate(plain), "perplexity": ppl, "prompts": len(base),
            "example": {"prompt": f"{base[0]} {trigger}", "continuation": triggered[0]}}
