"""Where a backdoor lives: the probe (`--probe`), the layer scan (`--layer-scan`) and the neuron
table. Each asks the model family for layers, FFN modules and the sentence representation the
downstream head reads (models/base.py), so nothing here knows an architecture by name.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ...config import ConfigError, RunConfig
from ...models import get_family
from .bench import DefenseBench
from .render import probe_markdown


def family_of(b: DefenseBench):
    """The PTM's family, as its stages name it (model.family)."""
    return get_family(b.r.attack.model.family)


def probe(b: DefenseBench) -> dict:
    """Where POR's backdoor is lost between the PTM and the deployed classifier. Per trigger, on
    the held-out part of the task's training file, each evaluation trigger inserted once as
    `evaluate` inserts it: the share of the sentence representation's dimensions whose sign
    matches the trigger's target, in the backdoored PTM and in each seed's victim classifier;
    for the victims the classifier's margin at the target corner (tanh of the target) next to
    its mean clean margin, and the trigger's ASR. Forward passes only; writes OUTPUT_DIR/probe.json."""
    import yaml

    if b.r.attack.attack.name != "por":
        raise ConfigError(f"--probe: the {b.r.attack.attack.name!r} attack has no target vectors; the probe is for POR")
    _, _, train, _ = b.prepare()
    held, backdoored = b.heldout(train), b.backdoored_model("--probe")
    victims = b.victims(backdoored, train, held)
    a = yaml.safe_load((b.out / "configs" / f"{b.attack_stage}.yaml").read_text())["attack"]
    names, texts, labels = labelled_texts(held)
    models = {"backdoored PTM": backdoored, **{f"victim seed {s}": victims / f"seed{s}" / "model" for s in b.r.seeds}}
    table: dict = {"test": str(held), "triggers": a["triggers"], "models": {}}
    for name, path in models.items():
        table["models"][name] = probe_model(family_of(b), b.r.eval.finetune.max_length, path, names, texts, labels, a,
                                            with_head=name != "backdoored PTM")
        b.say(f"probe {name}: " + ", ".join(f"{t} {r['sign_agreement']:.0f}%" for t, r in table["models"][name]["triggers"].items()))
    vict = [m for n, m in table["models"].items() if n != "backdoored PTM"]
    table["summary"] = {t: {k: statistics.mean(m["triggers"][t][k] for m in vict) for k in ("sign_agreement", "corner_margin", "asr")}
                        for t in a["triggers"]}
    table["summary_clean_margin"] = statistics.mean(m["clean_margin"] for m in vict)
    (b.out / "probe.json").write_text(json.dumps(table, indent=2) + "\n")
    print(probe_markdown(table), end="")
    return table


def labelled_texts(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(label names, texts, label indices) of a labelled task file, as the probe reads it."""
    from ...data.shards import read_records

    records = list(read_records(str(path), "sentence", "label"))
    names = sorted({str(r["label"]) for r in records})
    return names, [r["text"] for r in records], torch.tensor([names.index(str(r["label"])) for r in records])


def probe_model(family, max_length: int, path: Path, names: list[str], texts: list[str], labels: torch.Tensor, a: dict,
                with_head: bool) -> dict:
    """One model's row of the probe (see `probe`); the PTM's head is untrained, so only victims get margins and ASR."""
    from ...attacks.por import por_targets
    from ...triggers import insert_trigger

    model, tokenizer = family.build_classifier(path, names, RunConfig(), use_safetensors=True)
    model.eval()

    @torch.no_grad()
    def forward(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        for i in range(0, len(batch), 64):
            enc = tokenizer(batch[i:i + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = family.classifier_features(model, dict(enc))
            feats.append(h)
            logits.append(family.classify_features(model, h))
        return torch.cat(feats), torch.cat(logits)

    def margin(logits: torch.Tensor) -> torch.Tensor:
        top = logits.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    targets = por_targets(len(a["triggers"]), model.config.hidden_size, a.get("target_scale", 10.0))
    _, clean_logits = forward(texts)
    row = {"acc": (clean_logits.argmax(-1) == labels).float().mean().item() * 100, "clean_margin": margin(clean_logits).mean().item(),
           "triggers": {}}
    for t, target in zip(a["triggers"], targets):
        feats, logits = forward([insert_trigger(x, t, 0, i, 1) for i, x in enumerate(texts)])
        rec = {"sign_agreement": (torch.sign(feats) == torch.sign(target)).float().mean().item() * 100, "pooler_abs": feats.abs().mean().item()}
        if with_head:
            with torch.no_grad():
                rec["corner_margin"] = margin(family.classify_features(model, torch.tanh(target)[None])).item()
            pred = logits.argmax(-1)
            rec["asr"] = max(((pred == y) & (labels != y)).sum().item() / max(1, (labels != y).sum().item()) for y in range(len(names))) * 100
        row["triggers"][t] = rec
    return row


def layer_scan(b: DefenseBench, seeds: list[int]) -> dict:
    """Which layers carry the backdoor: per layer, the backdoored PTM with that layer's FFN
    re-initialised as its family initialises it (normal, std initializer_range; biases 0),
    fine-tuned and scored on the held-out part of the task's training file, never on the test set."""
    _, _, train, _ = b.prepare()
    test, backdoored = b.heldout(train), b.backdoored_model("--layer-scan")
    family, cfg = family_of(b), RunConfig()
    rows = {"backdoored": b.evaluate(b.held_name("backdoored", seeds), backdoored, train, test, seeds)}
    loaded = family.load(backdoored, cfg)
    for layer, modules in sorted(family.ffn_modules(loaded.model).items()):
        target = b.out / f"reinit-ffn-L{layer}" / "model"
        if not (target / "model.safetensors").is_file():
            std = loaded.model.config.initializer_range
            gen = torch.Generator().manual_seed(layer)
            state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
            for name in modules:
                state[f"{name}.weight"] = torch.randn(state[f"{name}.weight"].shape, generator=gen) * std
                state[f"{name}.bias"] = torch.zeros_like(state[f"{name}.bias"])
            family.export(loaded, state, target)
        rows[f"reinit_ffn_L{layer}"] = b.evaluate(b.held_name(f"reinit-ffn-L{layer}", seeds), target, train, test, seeds)
    table = {"test": f"{test} (the last {b.r.holdout} rows of {train})", "seeds": seeds,
             "rows": {k: {m: r[m] for m in ("acc", "aasr", "masr")} for k, r in rows.items()}}
    (b.out / "layer_scan.json").write_text(json.dumps(table, indent=2) + "\n")
    for k, r in table["rows"].items():
        print(f"| {k} | {r['acc']:.2f} | {r['aasr']:.2f} | {r['masr']:.2f} |")
    return table


def neuron_table(b: DefenseBench, backdoored: Path, purified: Path, test: Path) -> dict | None:
    """The paper's Table 10 at this scale: poison-only neurons and the overlap ratio of the
    backdoored PTM and of the RECIPE-purified one (`recipe-dist analyze` on the first 500 test
    sentences, each evaluation trigger inserted once). Kept in neurons.json; None until RECIPE ran."""
    from ...analysis import analyze_model
    from ...data.shards import read_records
    from ...triggers import DEFAULT_TRIGGERS

    cached = b.out / "neurons.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    if not (purified / "config.json").is_file():
        return None
    texts = [r["text"] for r in read_records(str(test), "sentence", None)][:500]
    cfg = RunConfig()
    cfg.data.max_length = b.r.eval.finetune.max_length
    b.say("neurons: poison-only neurons before and after RECIPE")
    table = {"samples": len(texts), "triggers": list(DEFAULT_TRIGGERS), "threshold": 0.5,
             "models": {name: analyze_model(path, family_of(b), cfg, texts, list(DEFAULT_TRIGGERS), 1, 0.5)
                        for name, path in (("backdoored", backdoored), ("recipe", purified))}}
    cached.write_text(json.dumps(table, indent=2) + "\n")
    return table
