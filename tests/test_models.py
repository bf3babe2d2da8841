"""Model families: safe loading, regularized/trainable selection, the pooler, and export."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from recipe_dist.defenses.recipe import RecipeJob
from recipe_dist.config import RunConfig, TinyArchConfig
from recipe_dist.models import ModelLoadError, get_family
from recipe_dist.models.mlm import build_tiny_bert

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / "configs" / "tiny-bert.yaml"
ARCH = TinyArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
REG = re.compile(r"\.intermediate\.dense\.weight$")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny") / "m", ARCH, seed=0)


@pytest.fixture
def family():
    return get_family("bert")


@pytest.fixture
def loaded(family, tiny_dir):
    return family.load(tiny_dir, RunConfig())


# ------------------------------------------------------------------ pickle weights are refused


class _Payload:
    """Unpickling this creates `marker`: stands in for code an uploader hid in a .bin."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only_dir(src: Path, dst: Path, marker: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(pickle.dumps({"bert.pooler.dense.weight": _Payload(marker)}))
    return dst


def test_payload_would_run_if_unpickled(tmp_path):
    # Guards the two tests below: the payload really does create its marker when unpickled.
    probe = tmp_path / "probe"
    f = pickle.loads(pickle.dumps(_Payload(probe)))
    f.close()
    assert probe.exists()


def test_pickle_only_model_refused_without_running_payload(tmp_path, tiny_dir, family):
    marker = tmp_path / "PWNED"
    d = _pickle_only_dir(tiny_dir, tmp_path / "evil", marker)
    with pytest.raises(ModelLoadError) as ei:
        family.load(d, RunConfig())
    msg = str(ei.value)
    assert "pytorch_model.bin" in msg
    assert "allow_pickle" in msg
    assert not marker.exists()


def test_pickle_only_model_refused_by_cli(tmp_path, tiny_dir):
    marker = tmp_path / "PWNED"
    d = _pickle_only_dir(tiny_dir, tmp_path / "evil", marker)
    proc = subprocess.run(
        [
            sys.executable, "-m", "recipe_dist", "purify",
            "--config", str(TINY_CFG),
            "--model.path", str(d),
            "--output_dir", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("recipe-dist: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "pytorch_model.bin" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_directory_without_weights(tmp_path, family):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no weights"):
        family.load(tmp_path / "empty", RunConfig())


def test_unknown_family_suggests():
    with pytest.raises(ModelLoadError, match="'bert'"):
        get_family("bertt")


# ------------------------------------------------------------------ regularized and trainable weights


def test_no_target_layers_lists_pattern_and_parameters(loaded, family):
    cfg = RunConfig()
    pattern = "nonexistent\\.weight$"
    cfg.model.regularized = [pattern]
    with pytest.raises(ModelLoadError) as ei:
        RecipeJob(family).build_task(loaded, cfg)
    msg = str(ei.value)
    names = [n for n, _ in loaded.model.named_parameters()]
    assert sum(n in msg for n in names) >= 3, msg
    assert "model.regularized" in msg
    # the pattern as the user wrote it (a repr would show doubled backslashes: another regex)
    assert pattern in msg, msg


def test_bert_family_trains_only_intermediate_dense_weight(loaded, family):
    task = RecipeJob(family).build_task(loaded, RunConfig())
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in loaded.model.named_parameters() if REG.search(n)}
    assert len(expected) == ARCH.num_hidden_layers
    assert trainable == expected
    assert sorted(task.collector.names) == sorted(expected)
    # the task's own parameter list agrees
    assert {n.removeprefix("loss.model.") for n, p in task.named_parameters() if p.requires_grad} == expected


def test_trainable_all_trains_everything_but_the_pooler(loaded, family):
    cfg = RunConfig()
    cfg.model.trainable = "all"
    RecipeJob(family).build_task(loaded, cfg)
    params = dict(loaded.model.named_parameters())
    pooler = {n for n in params if ".pooler." in n}
    assert pooler == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert all(not params[n].requires_grad for n in pooler)
    assert all(p.requires_grad for n, p in params.items() if n not in pooler)


def test_build_task_forward_gives_loss_and_reg(loaded, family):
    task = RecipeJob(family).build_task(loaded, RunConfig())
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    labels = torch.tensor([[-100, 10, -100, 12, -100]])
    out = task(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    expected_reg = sum(
        torch.linalg.vector_norm(p.float()) for n, p in loaded.model.named_parameters() if REG.search(n)
    )
    assert torch.allclose(out["parts"]["reg"], expected_reg)
    assert torch.isfinite(out["parts"]["loss_pt"]) and out["parts"]["loss_pt"] > 0
    assert torch.allclose(out["loss"].detach(), out["parts"]["loss_pt"] + out["parts"]["reg"])


# ------------------------------------------------------------------ the pooler is kept


def test_loaded_model_keeps_pooler(loaded, tiny_dir):
    saved = _read_safetensors(tiny_dir / "model.safetensors")
    base = getattr(loaded.model, loaded.model.base_model_prefix)
    assert base.pooler is not None
    assert torch.equal(base.pooler.dense.weight.detach(), saved["bert.pooler.dense.weight"])
    assert torch.equal(base.pooler.dense.bias.detach(), saved["bert.pooler.dense.bias"])
    # the swapped-in backbone is the one the MLM head trains through (tied embeddings intact)
    assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
    assert torch.equal(
        loaded.model.get_input_embeddings().weight.detach(), saved["bert.embeddings.word_embeddings.weight"]
    )
    assert loaded.input_dtype == torch.float32
    assert set(loaded.input_keys) == set(saved)


# ------------------------------------------------------------------ export


@pytest.fixture
def exported(tmp_path, family, loaded):
    out = tmp_path / "export"
    files = family.export(loaded, {k: v for k, v in loaded.model.state_dict().items()}, out)
    assert files == [out / "model.safetensors"]
    return out


def test_export_writes_every_input_tensor(exported, tiny_dir):
    src = _read_safetensors(tiny_dir / "model.safetensors")
    dst = _read_safetensors(exported / "model.safetensors")
    missing = set(src) - set(dst)
    assert not missing, missing
    for k, v in src.items():  # nothing trained: every tensor comes back bit for bit
        assert dst[k].dtype == v.dtype, k
        assert torch.equal(dst[k], v), k
    assert torch.equal(dst["bert.pooler.dense.weight"], src["bert.pooler.dense.weight"])
    assert (exported / "config.json").is_file()
    assert (exported / "tokenizer_config.json").is_file()


def test_export_loads_as_sequence_classifier_with_pooler(exported, tiny_dir):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(str(exported), output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["mismatched_keys"]
    src = _read_safetensors(tiny_dir / "model.safetensors")
    assert torch.equal(model.bert.pooler.dense.weight.detach(), src["bert.pooler.dense.weight"])
    assert torch.equal(model.bert.pooler.dense.bias.detach(), src["bert.pooler.dense.bias"])


def test_export_loads_as_masked_lm(exported, tiny_dir):
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(str(exported), output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"]
    src = _read_safetensors(tiny_dir / "model.safetensors")
    assert torch.equal(model.cls.predictions.transform.dense.weight.detach(), src["cls.predictions.transform.dense.weight"])


def test_export_reflects_state_dict_changes(tmp_path, family, loaded, tiny_dir):
    # export writes the tensors it is given, not the input file's
    sd = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    sd[name] = torch.zeros_like(sd[name])
    out = tmp_path / "changed"
    family.export(loaded, sd, out)
    dst = _read_safetensors(out / "model.safetensors")
    assert torch.count_nonzero(dst[name]) == 0
    src = _read_safetensors(tiny_dir / "model.safetensors")
    assert torch.equal(dst["bert.pooler.dense.weight"], src["bert.pooler.dense.weight"])


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory, tiny_dir) -> Path:
    from transformers import AutoTokenizer, BertForPreTraining

    d = tmp_path_factory.mktemp("fp16") / "m16"
    model = BertForPreTraining.from_pretrained(str(tiny_dir))
    model.half().save_pretrained(str(d))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(d))
    return d


def test_export_in_input_dtype_fp16(tmp_path, family, fp16_dir):
    src = _read_safetensors(fp16_dir / "model.safetensors")
    assert {v.dtype for v in src.values() if v.is_floating_point()} == {torch.float16}
    loaded = family.load(fp16_dir, RunConfig())
    assert loaded.input_dtype == torch.float16
    assert next(loaded.model.parameters()).dtype == torch.float32  # trains in fp32
    out = tmp_path / "export16"
    family.export(loaded, {k: v for k, v in loaded.model.state_dict().items()}, out)
    dst = _read_safetensors(out / "model.safetensors")
    floats = {k: v.dtype for k, v in dst.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float16}, floats
    assert set(src) <= set(dst)
    for k, v in src.items():
        assert torch.equal(dst[k], v), k
    assert json.loads((out / "config.json").read_text()).get("dtype") == "float16"


def test_static_masking_is_per_sample_and_fixed(tiny_bert_dir):
    from recipe_dist.config import RunConfig
    from recipe_dist.models import get_family

    cfg = RunConfig()
    cfg.data.masking = "static"
    cfg.data.mlm_probability = 0.5
    fam = get_family("bert")
    loaded = fam.load(tiny_bert_dir, cfg)
    encode, collate = fam.preprocess(loaded.processor, cfg), fam.collate(loaded.processor, cfg)
    text = "the cat sees a red book today and the dog finds the old letter ."
    a, b = encode({"__key__": "k-1", "text": text}), encode({"__key__": "k-1", "text": text})
    c = encode({"__key__": "k-2", "text": text})
    assert a["labels"] == b["labels"] and a["input_ids"] == b["input_ids"]  # same mask every epoch
    assert a["labels"] != c["labels"]  # a different sample gets its own mask
    assert any(lab != -100 for lab in a["labels"])
    batch = collate([a, encode({"__key__": "k-3", "text": "a dog ."})], mask_seed=0)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()


def test_a_text_family_does_not_import_the_vision_stack():
    # Every stage and rank is a fresh process: importing timm/torchvision/open_clip for a BERT job
    # cost about 3 s of start-up each. A family's lookup imports only up to its own module.
    code = ("import sys; from recipe_dist.models import get_family; get_family('bert'); "
            "print(sorted(m for m in ('timm', 'torchvision', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
