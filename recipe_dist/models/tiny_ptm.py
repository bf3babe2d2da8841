"""Pre-train the tiny SYNTHETIC BERT the way BERT itself was: masked LM plus a sentence-pair task.

A randomly initialised tiny BERT is a poor stand-in for a PTM: its [CLS] state and pooler carry
nothing, so a downstream fine-tuning has to rebuild them from scratch, which needs a large
learning rate that also rewrites every other weight (and any backdoor with them). BERT's own
pre-training trains the pooler through next-sentence prediction (NSP). The SYNTHETIC corpus has
no documents, so the NSP slot here predicts the tone of the first sentence of the pair (a same-tone
pair task, closer to NSP, did not train in a few hundred steps at this size). It trains [CLS]
and the pooler as NSP does for BERT, and gives the tiny PTM the tone feature a real PTM brings
to sentiment tasks. Be aware that this is the demo's downstream task family: the PTM is a
stand-in with strong task features, and its fine-tuning then changes it little, as fine-tuning
changes BERT-base little at lr 2e-5. The demo's downstream sets are drawn with other seeds.

Everything is generated from seeds; the result is labelled SYNTHETIC in the model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertForPreTraining, BertTokenizer, DataCollatorForLanguageModeling

from ..data import synthetic


def sentence_pairs(n: int, seed: int) -> list[tuple[str, str, int]]:
    """(a, b, label): a toned sentence, a neutral corpus sentence, and a's tone in the NSP slot."""
    toned = synthetic.sentiment(n, seed)
    neutral = synthetic.corpus(n, seed + 1)
    return [(a, b, y) for (a, y), b in zip(toned, neutral)]


def pretrain_tiny_bert(model_dir: Path, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0, max_length: int = 48) -> dict:
    """Continue a `build_tiny_bert` directory with MLM + pair prediction for `steps` steps, in place.

    Returns the last losses and the pair accuracy over the final 50 steps.
    """
    model_dir = Path(model_dir)
    tok = BertTokenizer.from_pretrained(str(model_dir))
    model = BertForPreTraining.from_pretrained(str(model_dir), use_safetensors=True)
    torch.manual_seed(seed)
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    collator.generator = torch.Generator().manual_seed(seed)
    pairs = sentence_pairs(steps * batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    model.train()
    mlm_tail, pair_tail, hits = [], [], []
    for step in range(steps):
        chunk = pairs[step * batch_size : (step + 1) * batch_size]
        enc = tok([a for a, _, _ in chunk], [b for _, b, _ in chunk], truncation=True, max_length=max_length, return_special_tokens_mask=True)
        batch = collator([{k: enc[k][i] for k in ("input_ids", "token_type_ids", "special_tokens_mask")} for i in range(len(chunk))])
        attn = (batch["input_ids"] != tok.pad_token_id).long()
        labels = torch.tensor([y for _, _, y in chunk])
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"], attention_mask=attn, labels=batch["labels"], next_sentence_label=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= steps - 50:
            with torch.no_grad():
                mlm = torch.nn.functional.cross_entropy(out.prediction_logits.view(-1, model.config.vocab_size), batch["labels"].view(-1))
                mlm_tail.append(mlm.item())
                pair_tail.append(out.loss.item() - mlm.item())
                hits += (out.seq_relationship_logits.argmax(-1) == labels).tolist()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    stats = {
        "steps": steps,
        "mlm_loss": sum(mlm_tail) / max(1, len(mlm_tail)),
        "nsp_slot_loss": sum(pair_tail) / max(1, len(pair_tail)),
        "nsp_slot_accuracy": sum(hits) / max(1, len(hits)),
    }
    (model_dir / "pretraining.json").write_text(json.dumps(stats, indent=2) + "\n")
    (model_dir / "SYNTHETIC.md").write_text(
        "Tiny BERT pre-trained for "
        f"{steps} steps on a SYNTHETIC template corpus (recipe_dist.data.synthetic): masked LM plus a "
        "tone prediction in the next-sentence-prediction slot. Not a real pre-trained model.\n"
    )
    return stats
