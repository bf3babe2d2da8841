"""`recipe-dist evaluate`: fine-tune a copy of a model on a clean task, then ACC / ASR / AASR / MASR.

Protocol (method.md section 3): fine-tune the model under test on a clean downstream task (SST-2
reference: AdamW lr 2e-5, batch 32, 3 epochs, max length 128, keep the last model), measure
accuracy on the clean test set, then insert each trigger once into every test sample (position
drawn per sample, `triggers.insert_trigger`) and measure the attack success rates
(`metrics`). With several seeds every seed is a separate fine-tuning from the untouched model;
the report holds the mean, the SAMPLE standard deviation (n - 1) and the per-seed numbers.

Each seed's result is kept in OUTPUT_DIR/seed<S>/result.json: a rerun into the same directory
(after a preemption, say) reuses the seeds scored with the same model files and settings.

The model directory is only read: the weights are loaded into memory and never written back.
Torch and transformers are imported lazily, so config and data errors are reported at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import NOT_BLANK, SEED, ConfigError, FinetuneConfig, Rule, _f, check_fields, gt, required, to_dict
from ..errors import RecipeError
from . import metrics
from ..models.load_report import load_with_summary  # noqa: F401  (part of this module's API)
from ..triggers import DEFAULT_TRIGGERS, insert_trigger


class EvalDataError(RecipeError, ValueError):
    """A task file cannot be used; the message names the file and the column or line."""


# --------------------------------------------------------------------------------------------
# Config


def _seed_list(text: str) -> list[int]:
    """The seeds of `seeds` ("1,2,3"); a ConfigError says what is wrong with the text."""
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"seeds: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise ConfigError(f"seeds: expected comma-separated integers, got {text!r}")
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds: repeated seed in {text!r}")
    bad = [s for s in out if not SEED(s)]
    if bad:
        raise ConfigError(f"seeds: {bad[0]} {SEED.text}")
    return out


def _seeds_ok(text: str) -> bool:
    if text.strip():
        _seed_list(text)
    return True


# A ConfigError is a ValueError, which the Rule reads as "refused".
SEEDS = Rule(_seeds_ok, "must be empty or comma-separated distinct integers in [0, 2**32), e.g. 1,2,3")
ONE_WORD_EACH = Rule(lambda v: len(v) > 0 and all(w and not any(c.isspace() for c in w) for w in v),
                     "must be one or more triggers, each a single word")


@dataclass
class EvalModelConfig:
    path: str = _f("", "Hugging Face model directory under test (required); it is only read", check=required("the model directory to evaluate"))
    family: str = _f("bert", "model family from the registry; it builds the classifier (bert, roberta, gpt2, llama; vit, vgg, clip)", check=NOT_BLANK)
    allow_pickle: bool = _f(False, "allow pickle weights (.bin/.pt); they can run code, so off by default")
    trust_remote_code: bool = _f(False, "run Python code shipped with the model; off unless you trust the uploader")


@dataclass
class TaskConfig:
    train_file: str = _f("", "clean training set: .tsv (with header), .csv or .jsonl; relative paths are from the working directory",
                         check=required("the clean training set"))
    test_file: str = _f("", "clean test set, same format; relative paths are from the working directory", check=required("the clean test set"))
    text_column: str = _f("sentence", "column/key holding the text; for image families the image path (relative to the task file)", check=NOT_BLANK)
    label_column: str = _f("label", "column/key holding the label", check=NOT_BLANK)
    num_labels: int = _f(0, "number of classes; 0 infers it from the labels", check=Rule(lambda v: v == 0 or v >= 2, "must be 0 (infer) or >= 2"))
    max_test_samples: int = _f(0, "score only the first N test samples (0: all); for a quick look, never for a reported figure",
                               check=Rule(lambda v: v >= 0, "must be >= 0 (0 means all)"))


@dataclass
class TriggerConfig:
    words: list[str] = _f(list(DEFAULT_TRIGGERS), "text triggers; each is inserted into a copy of the test set", check=ONE_WORD_EACH)
    patch_size: int = _f(4, "image families: side of NeuBA-vision's six checkerboard patches, each pasted on a copy of the test set", check=gt(0))
    times: int = _f(1, "insertions per test sample (method.md: once)", check=gt(0))
    seed: int = _f(0, "seed of the per-sample insertion positions (the same for every fine-tuning seed)", check=SEED)


@dataclass
class EvalConfig:
    output_dir: str = _f("runs/eval", "receives eval.json and eval.md, and each seed's result (seed<S>/result.json, reused by a rerun with the same model and settings)", check=NOT_BLANK)
    seeds: str = _f("", "comma-separated fine-tuning seeds, e.g. 1,2,3 (mean and sample std reported); empty uses finetune.seed", check=SEEDS)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    triggers: TriggerConfig = field(default_factory=TriggerConfig)
    save_models: bool = _f(False, "keep each seed's fine-tuned classifier in OUTPUT_DIR/seed<S>/model (e.g. for finemix)")
    baseline: str = _f("", "a second model (e.g. the one purify started from) scored with the same seeds, settings and test set "
                       "into OUTPUT_DIR/baseline/; eval.json and eval.md then give the difference",
                       check=Rule(lambda v: not v or Path(v).is_dir(), "must be a model directory (or empty)"))

    def seed_list(self) -> list[int]:
        return _seed_list(self.seeds) if self.seeds.strip() else [self.finetune.seed]

    def validate(self) -> None:
        """Every field's declared domain (`check_fields`), then the rules that span fields."""
        check_fields(self)
        if Path(self.output_dir).resolve() == Path(self.model.path).resolve():
            # eval.json, eval.md and seed<S>/ would land inside the model directory, which is only read.
            raise ConfigError(f"output_dir: {self.output_dir!r} is model.path; the model directory is only read, choose another output_dir")


# --------------------------------------------------------------------------------------------
# Data


def read_labelled(path: str, text_column: str, label_column: str, what: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a task file; a missing column or label is an EvalDataError."""
    from ..data.shards import ShardInputError, read_records

    if not Path(path).is_file():
        raise EvalDataError(f"{what}: file not found: {path}")
    if Path(path).suffix.lower() in (".txt", ""):
        raise EvalDataError(f"{what}: {path}: a .txt file has no label column '{label_column}'; use .tsv, .csv or .jsonl")
    texts, labels, lines = [], [], []
    try:
        for i, rec in enumerate(read_records(path, text_column, label_column)):
            label = rec.get("label")
            if label is None or str(label).strip() == "":
                raise EvalDataError(f"{what}: {path}: sample {i + 1} has no value in label column '{label_column}'")
            texts.append(rec["text"])
            labels.append(str(label).strip())
            lines.append(rec.get("line", i + 1))
    except ShardInputError as e:
        raise EvalDataError(f"{what}: {e}") from None
    if not texts:
        raise EvalDataError(f"{what}: {path}: no samples")
    # Integer class ids with one label of another form ('1.0', ' 1', 'pos') would silently become
    # a class of their own: name the first such row.
    ints = [s.isdigit() for s in labels]
    if any(ints) and not all(ints):
        i = ints.index(False)
        raise EvalDataError(f"{what}: {path}:{lines[i]}: label '{labels[i]}' is not an integer like the others "
                            f"(e.g. '{labels[ints.index(True)]}'); use one form for every label")
    return texts, labels


def label_space(train: list[str], test: list[str], num_labels: int) -> list[str]:
    """Label names in id order. Integer labels 0..K-1 keep their ids; other labels are sorted."""
    seen = set(train) | set(test)
    if all(s.isdigit() for s in seen):
        top = max(int(s) for s in seen)
        if num_labels and num_labels <= top:
            raise ConfigError(f"task.num_labels={num_labels} but the data has label {top}")
        return [str(i) for i in range(num_labels or top + 1)]
    names = sorted(set(train))
    unknown = sorted(set(test) - set(names))
    if unknown:
        raise EvalDataError(f"task.test_file: labels not in the training set: {', '.join(unknown[:5])}")
    if num_labels and num_labels != len(names):
        raise ConfigError(f"task.num_labels={num_labels} but the training set has {len(names)} labels ({', '.join(names[:10])})")
    return names


# --------------------------------------------------------------------------------------------
# Fine-tuning and prediction


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def model_inputs(processor, items: list, max_length: int) -> dict:
    """A batch of classifier inputs. Text items are strings (tokenized); image items are
    `ImageItem`s, preprocessed by the family's eval transform with their patch pasted before
    normalization. `processor` is build_classifier's second value: the tokenizer, or the
    family's ImagePreprocess."""
    if items and isinstance(items[0], ImageItem):
        import torch

        from ..triggers import paste_patch

        pixels = []
        for it in items:
            x = processor.eval(it.image)
            pixels.append(paste_patch(x, it.patches, it.trigger) if it.trigger is not None else x)
        return {"pixel_values": processor.normalize(torch.stack(pixels))}
    return dict(processor(items, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


@dataclass
class ImageItem:
    """One image of an image task, and the patch trigger pasted on it (None: clean)."""

    image: object  # PIL RGB image, decoded once
    trigger: int | None = None
    patches: object = None  # [6, 3, s, s] checkerboards (triggers.checkerboard_patches)


def _predict(model, processor, texts: list, cfg: EvalConfig, device) -> list[int]:
    import torch

    from ..models.base import eval_mode

    from tqdm import tqdm

    out: list[int] = []
    bs = cfg.finetune.batch_size * 2
    with torch.no_grad(), eval_mode(model):
        for i in tqdm(range(0, len(texts), bs), desc="scoring", unit="batch", disable=None, leave=False, dynamic_ncols=True):
            enc = model_inputs(processor, texts[i : i + bs], cfg.finetune.max_length)
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            out += logits.argmax(-1).tolist()
    return out


def train_classifier(model, processor, texts: list[str], y: list[int], f: FinetuneConfig, seed: int, device, what: str = "") -> list[float]:
    """Fine-tune `model` in place: AdamW, linear decay to 0, no warmup, clipping, `f.epochs`
    passes in an order drawn from `seed` (f: lr, epochs, batch_size, max_length, weight_decay,
    grad_clip). Returns the mean training loss per epoch. Shared by evaluate and finemix."""
    import torch
    from transformers import get_scheduler

    steps_per_epoch = (len(texts) + f.batch_size - 1) // f.batch_size
    total = steps_per_epoch * f.epochs
    if total == 0:
        return []
    opt = torch.optim.AdamW(model.parameters(), lr=f.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=f.weight_decay)
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=0, num_training_steps=total)
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    step, losses = 0, []
    # A bar on a terminal (the fine-tuning is minutes of silence otherwise); plain epoch lines in logs.
    bar = tqdm(total=total, desc=f"{what or 'fine-tune'}", unit="step", disable=None, leave=False, dynamic_ncols=True)
    for epoch in range(f.epochs):
        model.train()
        order = torch.randperm(len(texts), generator=gen).tolist()
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * f.batch_size : (b + 1) * f.batch_size]
            enc = {k: v.to(device) for k, v in model_inputs(processor, [texts[i] for i in idx], f.max_length).items()}
            loss = model(**enc, labels=torch.tensor([y[i] for i in idx], device=device)).loss
            loss.backward()
            if f.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            running += loss.item()
            step += 1
            bar.update(1)
        losses.append(running / max(steps_per_epoch, 1))
        _log(f"{what} epoch {epoch + 1}/{f.epochs}: mean train loss {losses[-1]:.4f} ({step}/{total} steps)")
    bar.close()
    return losses


def finetune_and_predict(cfg: EvalConfig, seed: int, data: dict, device) -> dict:
    """One seed: fresh copy of the model, fine-tune, predict clean and triggered test sets, score."""
    import random

    import numpy as np
    import torch
    from ..models import get_family

    f = cfg.finetune
    names = data["label_names"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # before loading: the new classifier head is initialised from it
    model, processor = get_family(cfg.model.family).build_classifier(Path(cfg.model.path), names, cfg, use_safetensors=data["is_safe"])
    model = model.to(device)

    train_classifier(model, processor, data["train_texts"], data["train_ids"], f, seed, device, what=f"seed {seed}")
    if cfg.save_models:
        if not hasattr(model, "save_pretrained"):
            raise ConfigError(f"save_models: the {cfg.model.family} family's classifier is not a Hugging Face model and cannot be saved")
        target = Path(cfg.output_dir) / f"seed{seed}" / "model"
        model.save_pretrained(str(target))
        processor.save_pretrained(str(target))
        _log(f"seed {seed}: fine-tuned classifier saved to {target}")

    true = data["test_labels"]
    clean = [names[p] for p in _predict(model, processor, data["test_texts"], cfg, device)]
    triggered = {t: [names[p] for p in _predict(model, processor, tt, cfg, device)] for t, tt in data["triggered"].items()}
    table = metrics.asr_table(true, triggered, names)
    result = {
        "seed": seed,
        "invalid": invalid_reason(clean, true, names),
        "acc": metrics.accuracy(clean, true),
        "asr": table,
        "asr_per_trigger": metrics.asr_per_trigger(table),
        "aasr": metrics.aasr(table),
        "masr": metrics.masr(table),
    }
    _log(f"seed {seed}: acc {result['acc']:.2f}  aasr {result['aasr']:.2f}  masr {result['masr']:.2f}"
         + (f"  INVALID: {result['invalid']}" if result["invalid"] else ""))
    return result


def _scoring_key(cfg: EvalConfig) -> dict:
    """What a seed's score depends on besides the seed: every setting but the seed list and the
    output directory, and the model's files by content (a model rebuilt at the same path is
    another model)."""
    from ..models.base import sha256_files

    model = Path(cfg.model.path)
    files = sorted(f for f in model.iterdir() if f.is_file()) if model.is_dir() else [model]
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("seeds", "output_dir")}
    return {"model_sha256": sha256_files(files), "settings": settings}


def _scored_once(cfg: EvalConfig, seed: int, data: dict, device, key: dict) -> dict:
    """`finetune_and_predict`, or the result a previous run into the same output directory left
    for this seed with the same key. Every seed re-seeds everything it draws, so its score does
    not depend on the seeds before it: an evaluation stopped in its third seed (a preemption, a
    session's end) keeps the first two. The result is written whole (rename) after the seed ends."""
    import os

    done = Path(cfg.output_dir) / f"seed{seed}" / "result.json"
    try:
        saved = json.loads(done.read_text())
    except (OSError, ValueError):  # none yet, or cut short: score it again
        saved = None
    if isinstance(saved, dict) and saved.get("key") == key and "result" in saved:
        _log(f"seed {seed}: reusing {done} (same model files and settings)")
        return saved["result"]
    result = finetune_and_predict(cfg, seed, data, device)
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    os.replace(tmp, done)
    return result


# How far above chance a classifier must score, and how concentrated its predictions may be, for
# its ASR to mean anything: a classifier that learned nothing predicts one class for every input,
# triggered or not, and then "flips" every sample of the other classes (ASR 100 with no backdoor).
CHANCE_MARGIN = 5.0
COLLAPSE_SHARE = 0.98


def invalid_reason(preds: list, true: list, names: list) -> str:
    """Why ASR of this fine-tuned classifier is not evidence (empty when it is)."""
    from collections import Counter

    n = len(true)
    majority_true = max(Counter(true).values()) / n
    chance = 100.0 * max(majority_true, 1.0 / len(names))
    acc = metrics.accuracy(preds, true)
    label, count = Counter(preds).most_common(1)[0]
    if count / n >= COLLAPSE_SHARE and majority_true < COLLAPSE_SHARE:
        return f"predictions collapse to one class ({label} on {100 * count / n:.1f}% of clean test samples)"
    if acc < chance + CHANCE_MARGIN:
        return f"clean ACC {acc:.2f} is not {CHANCE_MARGIN:g} points above chance ({chance:.2f}): the classifier did not learn the task"
    return ""


def prepare(cfg: EvalConfig) -> dict:
    """Read and check everything before any model is loaded: model files, task files, labels."""
    from ..models.base import ModelLoadError, check_safetensors, weight_files

    t = cfg.task
    # Before anything is opened: a pickle-only directory is refused unless allow_pickle.
    files, is_safe = weight_files(Path(cfg.model.path), cfg.model.allow_pickle)
    if is_safe:
        # A model with NaN/inf weights would "evaluate" to a constant prediction: refuse it.
        check_safetensors(files, finite=True)
    if cfg.finetune.epochs == 0:
        # Scoring as it is only means something for a classifier that carries its trained head.
        arch = json.loads((Path(cfg.model.path) / "config.json").read_text()).get("architectures") or [] if (Path(cfg.model.path) / "config.json").is_file() else []
        if not any(a.endswith("ForSequenceClassification") for a in arch):
            raise ConfigError(f"finetune.epochs=0 scores a fine-tuned classifier as it is, but {cfg.model.path} is {arch or 'not a classifier'}; "
                              "give it a *ForSequenceClassification directory or fine-tune (finetune.epochs >= 1)")
    from ..models import get_family

    family = get_family(cfg.model.family)
    if family.modality == "text" and not (Path(cfg.model.path) / "config.json").is_file():
        raise ModelLoadError(f"model.path: no config.json in {cfg.model.path}")
    train_texts, train_labels = read_labelled(t.train_file, t.text_column, t.label_column, "task.train_file")
    test_texts, test_labels = read_labelled(t.test_file, t.text_column, t.label_column, "task.test_file")
    if t.max_test_samples:
        test_texts, test_labels = test_texts[: t.max_test_samples], test_labels[: t.max_test_samples]
    if family.modality != "text":
        # An image task: the text column holds image paths, relative to the task file's directory.
        train_texts = [ImageItem(im) for im in _open_images(train_texts, t.train_file, "task.train_file")]
        test_texts = [ImageItem(im) for im in _open_images(test_texts, t.test_file, "task.test_file")]
    if cfg.finetune.max_train_samples:
        train_texts = train_texts[: cfg.finetune.max_train_samples]
        train_labels = train_labels[: cfg.finetune.max_train_samples]
    for labels, key, path in ((train_labels, "task.train_file", t.train_file), (test_labels, "task.test_file", t.test_file)):
        if len(set(labels)) < 2:
            # ASR counts samples whose true label differs from the target: with one class nothing is measured.
            raise EvalDataError(f"{key}: {path} has only one class ({labels[0]}); ACC and ASR need at least two")
    names = label_space(train_labels, test_labels, t.num_labels)
    ids = {n: i for i, n in enumerate(names)}
    tr = cfg.triggers
    if family.modality != "text":
        from ..triggers import checkerboard_patches

        # NeuBA-vision's six checkerboards, each pasted on a copy of every test image.
        patches = checkerboard_patches(tr.patch_size)
        triggered = {f"checker{k}": [ImageItem(it.image, k, patches) for it in test_texts] for k in range(len(patches))}
    else:
        triggered = {w: [insert_trigger(s, w, tr.seed, i, tr.times) for i, s in enumerate(test_texts)] for w in tr.words}
    return {
        "is_safe": is_safe,
        "train_texts": train_texts,
        "train_ids": [ids[lab] for lab in train_labels],
        "test_texts": test_texts,
        "test_labels": test_labels,
        "label_names": names,
        "triggered": triggered,
    }


def _open_images(paths: list[str], task_file: str, what: str) -> list:
    from ..models.vision import open_image

    base = Path(task_file).parent
    out = []
    for i, p in enumerate(paths):
        f = Path(p) if Path(p).is_absolute() else base / p
        if not f.is_file():
            raise EvalDataError(f"{what}: {task_file}: sample {i + 1}: image not found: {f}")
        try:
            out.append(open_image(f.read_bytes(), str(f)))
        except RecipeError as e:
            raise EvalDataError(f"{what}: {e}") from None
    return out


def _markdown(report: dict) -> str:
    std = report["std"]
    n = len(report["seeds"])
    lines = [f"# Backdoor evaluation: {report['model']}", ""]
    if not report.get("valid", True):
        lines += [f"**INVALID: the ASR figures below are not evidence of a backdoor or of its absence.** "
                  f"{'; '.join(f'seed {s}: {why}' for s, why in report['invalid_seeds'].items())}.", ""]
    lines += [
        f"Seeds: {', '.join(map(str, report['seeds']))} "
        f"({'mean; std is the sample std over ' + str(n) + ' seeds' if n > 1 else 'one seed: no spread measured (std n/a)'}). "
        f"Train {report['n_train']}, test {report['n_test']} samples. All values in percent.",
        "",
        "| metric | mean | std |" + (" baseline | difference |" if "baseline" in report else ""),
        "| --- | ---: | ---: |" + (" ---: | ---: |" if "baseline" in report else ""),
    ]
    base_invalid = "baseline" in report and not report["baseline"]["valid"]
    for k in ("acc", "aasr", "masr"):
        extra = (f" {report['baseline'][k]:.2f}{' (INVALID)' if base_invalid else ''} | {report['difference'][k]:+.2f} |"
                 if "baseline" in report else "")
        spread = f"{std[k]:.2f}" if n > 1 else "n/a"
        lines.append(f"| {k.upper()} | {report[k]:.2f} | {spread} |{extra}")
    labels = report["labels"]
    lines += [
        "",
        "| trigger | ASR(t) | " + " | ".join(f"ASR(t, {y})" for y in labels) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for t, row in report["asr"].items():
        lines.append(
            f"| {t} | {report['asr_per_trigger'][t]:.2f} ± {std['asr_per_trigger'][t]:.2f} | "
            + " | ".join(f"{row[y]:.2f}" for y in labels)
            + " |"
        )
    tr = report["config"]["triggers"]
    lines += [
        "",
        "**What these numbers are** (method.md section 3). ACC: share of clean test samples classified correctly. "
        "ASR(t, y): among test samples whose true label is not y, the share classified y once trigger t is inserted. "
        "ASR(t): max over y (the target label is unknown). AASR: mean of ASR(t) over the triggers; MASR: their max.",
        "",
        f"**What they cover.** Only the triggers listed above ({', '.join(report['asr'])}), each inserted "
        f"{tr['times']} time(s) per sample at seeded positions. A backdoor with another trigger is not measured here. "
        "A clean model has a floor of its own (errors that a trigger word happens to push one way): compare with the "
        "same evaluation of the model before purification (`--baseline`), not with 0.",
    ]
    if "baseline" in report:
        lines += ["", f"Baseline: {report['baseline']['model']}, the same seeds, settings and test samples ({report['baseline']['dir']})."]
    return "\n".join(lines) + "\n"


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation for every seed; write output_dir/eval.json and eval.md; return the report."""
    seeds = cfg.seed_list()
    data = prepare(cfg)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _log(
        f"{cfg.model.path}: {len(data['train_texts'])} train / {len(data['test_texts'])} test samples, "
        f"labels {data['label_names']}, triggers {list(data['triggered'])}, seeds {seeds}, device {device}"
    )
    key = _scoring_key(cfg)
    per_seed = [_scored_once(cfg, s, data, device, key) for s in seeds]
    mean, std = metrics.summarize_seeds([{k: v for k, v in r.items() if k != "invalid"} for r in per_seed])
    invalid = {r["seed"]: r["invalid"] for r in per_seed if r["invalid"]}
    report = {
        "valid": not invalid,
        "invalid_seeds": invalid,
        "model": cfg.model.path,
        "acc": mean["acc"],
        "asr": mean["asr"],
        "aasr": mean["aasr"],
        "masr": mean["masr"],
        "asr_per_trigger": mean["asr_per_trigger"],
        "std": std,
        "std_kind": "sample (n - 1); 0.0 for a single seed",
        "per_seed": per_seed,
        "seeds": seeds,
        "labels": data["label_names"],
        "n_train": len(data["train_texts"]),
        "n_test": len(data["test_texts"]),
        "config": to_dict(cfg),
    }
    out = Path(cfg.output_dir)
    if cfg.baseline:
        import copy

        base_cfg = copy.deepcopy(cfg)
        base_cfg.model.path, base_cfg.baseline, base_cfg.output_dir = cfg.baseline, "", str(out / "baseline")
        _log(f"baseline {cfg.baseline}: the same seeds, settings and test samples")
        base = evaluate(base_cfg)
        report["baseline"] = {"model": cfg.baseline, "dir": str(out / "baseline"), "valid": base["valid"],
                              **{k: base[k] for k in ("acc", "aasr", "masr")}}
        report["difference"] = {k: report[k] - base[k] for k in ("acc", "aasr", "masr")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(_markdown(report))
    return report


__all__ = ["EvalConfig", "EvalDataError", "evaluate", "load_with_summary", "prepare", "read_labelled", "label_space"]
