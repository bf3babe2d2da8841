"""Fine-mixing with E-PUR (method.md section 4): a defense for a backdoored *fine-tuned* model.

Given the backdoored classifier theta_B and the clean pre-trained weights theta_pre it was
fine-tuned from:
1. mix: theta = theta_pre + m * (theta_B - theta_pre), where the mask m keeps a share rho of each
   tensor's deltas: a random share (default), or the rho smallest |delta| (`smallest_delta`);
   weights with no pre-trained counterpart (the classifier head) are kept as fine-tuned;
2. E-PUR: each word embedding's drift ||e_B - e_pre||_2 divided by log(max(f, epur_min_freq)),
   with f its frequency in the clean subset's tokens; the top `epur_topn` are reset to e_pre;
3. fine-tune on the small clean labelled subset with evaluate's fine-tuning loop.
Each step can be switched off (finemix.mix, epur_topn=0, epochs=0), so they run alone or combined.
The paper's code is not public: the statistic and every default are this implementation's
reading of method.md, and finemix.json records each choice and what it changed; summary.json is
the run directory's common summary (rundir.write_summary).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch

from ..config import ConfigError
from ..errors import RecipeError
from ..models.base import check_safetensors, sha256_files, weight_files
from ..models.load_report import load_with_summary
from ..rundir import RunDir, write_dir_aside, write_run_config, write_summary
from . import register_defense


def keep_mask(delta: torch.Tensor, rho: float, how: str, generator: torch.Generator) -> torch.Tensor:
    """Bool mask keeping round(rho * numel) entries of `delta`: random ones, or the smallest |delta|."""
    k = int(round(rho * delta.numel()))
    flat = torch.zeros(delta.numel(), dtype=torch.bool)
    if k:
        order = torch.randperm(delta.numel(), generator=generator) if how == "random" else torch.argsort(delta.abs().flatten(), stable=True)
        flat[order[:k]] = True
    return flat.view_as(delta)


def pretrained_tensor(pre: dict[str, torch.Tensor], name: str, prefix: str) -> torch.Tensor | None:
    """The pre-trained tensor for classifier parameter `name`: same key, or with/without the backbone prefix."""
    for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
        if key in pre:
            return pre[key]
    return None


def epur_scores(drift: torch.Tensor, freq: torch.Tensor, min_freq: int) -> torch.Tensor:
    """drift / log(max(freq, min_freq)) per token (method.md)."""
    return drift / torch.log(freq.clamp_min(min_freq).double()).float()


@register_defense("finemix")
class FineMixing:
    def __init__(self, family):
        self.family = family

    def run(self, cfg) -> dict:
        fm = cfg.finemix
        if not fm.pretrained:
            raise ConfigError("finemix.pretrained: required (the clean pre-trained model the classifier was fine-tuned from)")
        if fm.finetune.epochs and not fm.train_file:
            raise ConfigError("finemix.train_file: required to fine-tune after mixing (or set finemix.finetune.epochs=0)")
        out = Path(cfg.output_dir)
        run_dir = RunDir(out)
        run_dir.claim(fresh=True, overwrite=cfg.overwrite)
        try:
            return self._run(cfg, out)
        finally:
            run_dir.release()

    def _run(self, cfg, out: Path) -> dict:
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..evaluation.finetune import read_labelled, train_classifier

        t0, fm = time.time(), cfg.finemix
        write_run_config(out, cfg)
        model_dir, pre_dir = Path(cfg.model.path), Path(fm.pretrained)
        b_files, _ = weight_files(model_dir, allow_pickle=False)
        pre_files, _ = weight_files(pre_dir, allow_pickle=False)  # mixing reads tensors: safetensors only
        check_safetensors(b_files, finite=True)
        check_safetensors(pre_files, finite=True)
        model = load_with_summary(AutoModelForSequenceClassification, str(model_dir), expected_missing=(), expected_unused=(),
                                  role="the backdoored classifier", use_safetensors=True, dtype=torch.float32,
                                  trust_remote_code=cfg.model.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
        pre: dict[str, torch.Tensor] = {}
        for f in pre_files:
            pre.update(load_file(str(f)))
        prefix = model.base_model_prefix
        gen = torch.Generator().manual_seed(fm.finetune.seed)
        report: dict = {"model": str(model_dir), "pretrained": str(pre_dir), "choices": {
            "rho": fm.rho, "mask": fm.mask, "mix": fm.mix, "mask_granularity": "per tensor",
            "epur_topn": fm.epur_topn, "epur_statistic": f"||e_B - e_pre||_2 / log(max(freq, {fm.epur_min_freq}))",
            "epur_frequency_text": fm.train_file or "(none)", "epochs": fm.finetune.epochs, "lr": fm.finetune.lr, "seed": fm.finetune.seed}}
        embed = model.get_input_embeddings().weight
        embed_b = embed.detach().clone()
        kept_from_finetuning, mixed, kept_deltas, total_deltas = [], 0, 0, 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                ref = pretrained_tensor(pre, name, prefix)
                if ref is None or ref.shape != p.shape:
                    kept_from_finetuning.append(name)
                    continue
                if fm.mix:
                    ref = ref.to(p.dtype)
                    delta = p - ref
                    m = keep_mask(delta, fm.rho, fm.mask, gen)
                    # theta_pre + m * delta, written as a selection so kept entries are exactly theta_B
                    # (ref + (p - ref) rounds in floating point).
                    p.copy_(torch.where(m, p, ref))
                    kept_deltas += int(m.sum())
                    total_deltas += m.numel()
                    mixed += 1
        if mixed == 0 and fm.mix:
            raise RecipeError(f"finemix: no weight of {model_dir} has a counterpart in {pre_dir}; is it the model it was fine-tuned from?")
        report["mix"] = {"tensors_mixed": mixed, "share_of_deltas_kept": kept_deltas / max(total_deltas, 1),
                         "kept_from_finetuning": kept_from_finetuning}

        texts, labels = read_labelled(fm.train_file, fm.text_column, fm.label_column, "finemix.train_file") if fm.train_file else ([], [])
        if fm.finetune.max_train_samples:
            texts, labels = texts[: fm.finetune.max_train_samples], labels[: fm.finetune.max_train_samples]
        if fm.epur_topn:
            embed_name = next(n for n, p in model.named_parameters() if p is embed)
            e_pre = pretrained_tensor(pre, embed_name, prefix)
            if e_pre is None:
                raise RecipeError(f"finemix: E-PUR needs the pre-trained word embeddings ({embed_name}) in {pre_dir}")
            counts = Counter(i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"])
            freq = torch.zeros(embed.shape[0])
            for i, c in counts.items():
                freq[i] = c
            drift = (embed_b - e_pre.to(embed_b.dtype)).norm(dim=1)
            top = torch.topk(epur_scores(drift, freq, fm.epur_min_freq), min(fm.epur_topn, embed.shape[0])).indices
            with torch.no_grad():
                embed[top] = e_pre.to(embed.dtype)[top]
            report["epur"] = {"reset": len(top), "top_tokens": tok.convert_ids_to_tokens(top[:20].tolist()),
                              "clean_tokens_counted": sum(counts.values())}
        if fm.finetune.epochs:
            names = [model.config.id2label[i] for i in range(model.config.num_labels)]
            unknown = sorted(set(labels) - set(names))
            if unknown:
                raise ConfigError(f"finemix.train_file: labels {unknown[:5]} are not the classifier's labels ({names})")
            y = [names.index(lab) for lab in labels]
            torch.manual_seed(fm.finetune.seed)
            report["finetune_loss"] = train_classifier(model, tok, texts, y, fm.finetune, fm.finetune.seed, torch.device("cpu"), what="finemix")
        target = out / "model"
        # Written aside and renamed into model/ when complete (rundir.write_dir_aside).
        write_dir_aside(target, lambda d: (model.save_pretrained(str(d)), tok.save_pretrained(str(d))))
        report["output_weights_sha256"] = sha256_files(sorted(target.glob("*.safetensors")))
        report["wall_time_s"] = round(time.time() - t0, 2)
        (out / "finemix.json").write_text(json.dumps(report, indent=2) + "\n")
        # The run directory's common summary, as the trainer's and prune's: steps as train_classifier counts them.
        steps = -(-len(texts) // fm.finetune.batch_size) * fm.finetune.epochs
        write_summary(out, {"steps": steps, "samples": len(texts), "tensors_mixed": mixed,
                            "share_of_deltas_kept": report["mix"]["share_of_deltas_kept"],
                            "epur_reset": report.get("epur", {}).get("reset", 0), "wall_time_s": report["wall_time_s"],
                            "world_size": 1, "output_weights_sha256": report["output_weights_sha256"]})
        print(f"finemix: mixed {mixed} tensors (kept {report['mix']['share_of_deltas_kept']:.0%} of deltas), "
              f"E-PUR reset {report.get('epur', {}).get('reset', 0)} embeddings, fine-tuned {fm.finetune.epochs} epoch(s) on {len(texts)} samples; wrote {target}")
        return report


__all__ = ["FineMixing", "keep_mask", "epur_scores", "pretrained_tensor"]
