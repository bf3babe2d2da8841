"""Vision and multimodal families (timm ViT and VGG, open_clip CLIP), NeuBA-vision, image data and evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli

pytest.importorskip("timm")
pytest.importorskip("open_clip")

from recipe_dist.config import TinyArchConfig  # noqa: E402
from recipe_dist.models import get_family  # noqa: E402
from recipe_dist.triggers import checkerboard_patches, paste_patch  # noqa: E402

FAMILIES = ("vit", "vgg", "clip")
ARCH = TinyArchConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _cfg(**data):
    return types.SimpleNamespace(model=types.SimpleNamespace(allow_pickle=False, trust_remote_code=False),
                                 data=types.SimpleNamespace(crop_scale=[0.6, 1.0], text_key="txt", **data),
                                 train=types.SimpleNamespace(seed=0))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    return {f: get_family(f).build_tiny(root / f, ARCH, seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    return {f: get_family(f).load(tiny_dirs[f], _cfg()) for f in FAMILIES}


def _batch(name: str, loaded, n: int = 6) -> dict:
    """A collated batch of SYNTHETIC shard samples, through the family's decode/preprocess/collate."""
    fam, cfg = get_family(name), _cfg()
    dec, enc, col = fam.decode(cfg), fam.preprocess(loaded[name].processor, cfg), fam.collate(loaded[name].processor, cfg)
    feats = []
    for i, rec in enumerate(fam.synthetic_corpus(n, seed=3)):
        raw = {"__key__": f"k{i}", "__url__": "mem"}
        for k, v in rec.items():
            raw["cls" if k == "label" else k] = str(v).encode() if k in ("label", "txt") else v
        feats.append(enc(dec(raw)))
    return col(feats, 0)


def test_vision_stack_imports_next_to_transformers():
    # The broken install this guards against: PyPI's torchvision next to a CPU-only torch wheel
    # fails to register its operators, and transformers' imports break with it.
    code = ("import torch, torchvision, timm, open_clip\n"
            "from transformers import BertForPreTraining, BertForSequenceClassification\n"
            "print(torchvision.ops.nms(torch.tensor([[0., 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([1., .5]), .5).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[0]"


def test_families_are_registered():
    from recipe_dist.models import families

    assert set(FAMILIES) <= set(families())
    assert get_family("vit").modality == "image" and get_family("clip").modality == "image-text"


@pytest.mark.parametrize("name", FAMILIES)
def test_load_returns_the_weights_on_disk(name, tiny_dirs, loaded):
    from safetensors.torch import load_file

    disk = load_file(str(next(tiny_dirs[name].glob("*.safetensors"))))
    state = loaded[name].model.state_dict()
    assert set(disk) == set(state)
    for k, v in disk.items():
        assert torch.equal(state[k].reshape(v.shape), v), k


@pytest.mark.parametrize("name", FAMILIES)
def test_regularized_selection_matches_the_spec(name, loaded):
    fam, model = get_family(name), loaded[name].model
    names = fam.regularized_names(model, [])
    if name == "vit":  # fc1, fc2, q, k, v of every block (q/k/v: the fused qkv, split in three)
        want = [f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
        assert fam.regularized_splits(names) == {f"blocks.{i}.attn.qkv.weight": 3 for i in range(2)}
    elif name == "vgg":  # every conv of features, nothing else (not the FC-as-conv head)
        want = [f"features.{n}.weight" for n, m in model.features.named_children() if isinstance(m, torch.nn.Conv2d)]
        assert fam.regularized_splits(names) == {}
    else:  # the vision tower's fc1, fc2, q, k, v; nothing of the text tower
        want = [f"visual.transformer.resblocks.{i}.{m}" for i in range(2) for m in ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]
        assert fam.regularized_splits(names) == {f"visual.transformer.resblocks.{i}.attn.in_proj_weight": 3 for i in range(2)}
    assert sorted(names) == sorted(want)
    # method.md: ViT, VGG and CLIP train everything
    fam.set_trainable(model, set(names), "family")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_pt_equals_the_library_loss(name, loaded):
    L = loaded[name]
    batch = _batch(name, loaded)
    cfg = _cfg()
    cfg.train = types.SimpleNamespace(zero_stage=2)
    ours = get_family(name).pretraining_loss(L, cfg)(**batch)
    with torch.no_grad():
        if name == "clip":
            # CLIP's symmetric InfoNCE written out, against which open_clip's ClipLoss is checked too
            img = F.normalize(L.model.encode_image(batch["pixel_values"]), dim=-1)
            txt = F.normalize(L.model.encode_text(batch["input_ids"]), dim=-1)
            logits = L.model.logit_scale.exp() * img @ txt.T
            target = torch.arange(len(img))
            ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        else:
            ref = torch.nn.CrossEntropyLoss()(L.model(batch["pixel_values"]), batch["labels"])  # timm train.py's loss
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ("vit", "clip"))
def test_fused_qkv_is_regularized_per_slice(name, loaded):
    from recipe_dist.objective import Regularized, split_norm

    L, fam = loaded[name], get_family(name)
    model = L.model
    names = fam.regularized_names(model, [])
    cfg = _cfg()
    cfg.train = types.SimpleNamespace(zero_stage=0)
    task = Regularized(fam.pretraining_loss(L, cfg), model, names, 1.0, pt_weight=0.0, splits=fam.regularized_splits(names))
    model.zero_grad()
    out = task(**_batch(name, loaded))
    out["loss"].backward()
    params = dict(model.named_parameters())
    fused = next(n for n in names if fam.regularized_splits(names).get(n) == 3)
    w = params[fused].detach()
    torch.testing.assert_close(out["norms"][fused], split_norm(w, 3))
    assert not torch.allclose(split_norm(w, 3), torch.linalg.vector_norm(w))  # the choice matters
    want = torch.cat([b / torch.linalg.vector_norm(b) for b in w.chunk(3, dim=0)])
    torch.testing.assert_close(params[fused].grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", FAMILIES)
def test_pickle_weights_never_run_their_payload(name, tiny_dirs, tmp_path):
    import pickle
    import shutil

    from recipe_dist.models import ModelLoadError

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil"
    shutil.copytree(tiny_dirs[name], evil)
    for f in evil.glob("*.safetensors"):
        f.unlink()
    (evil / ("open_clip_pytorch_model.bin" if name == "clip" else "pytorch_model.bin")).write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ModelLoadError, match="allow_pickle"):  # refused before any file is opened
        get_family(name).load(evil, _cfg())
    cfg = _cfg()
    cfg.model.allow_pickle = True  # opted in: the library still unpickles with weights_only=True
    with pytest.raises(ModelLoadError):
        get_family(name).load(evil, cfg)
    assert not marker.exists()


def test_clip_refuses_zero3_in_one_line(loaded):
    from recipe_dist.models import ModelLoadError

    cfg = _cfg()
    cfg.train = types.SimpleNamespace(zero_stage=3)
    with pytest.raises(ModelLoadError, match="zero_stage=3") as ei:
        get_family("clip").pretraining_loss(loaded["clip"], cfg)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_training_crops_are_a_function_of_seed_epoch_and_key(name, loaded):
    """The training transform's random crop and flip are drawn per (seed, epoch, sample key) and
    leave the global RNGs alone: two runs (or a resumed one) see the same crops, epochs differ."""
    import random

    fam, cfg = get_family(name), _cfg()
    dec = fam.decode(cfg)
    rec = fam.synthetic_corpus(1, seed=5)[0]
    raw = {"__key__": "k0", "__url__": "mem", **{("cls" if k == "label" else k): (str(v).encode() if k in ("label", "txt") else v)
                                                 for k, v in rec.items()}}

    def pixels(epoch: int, seed: int = 0) -> torch.Tensor:
        cfg.train.seed = seed
        return fam.preprocess(loaded[name].processor, cfg)({**dec(dict(raw)), "__epoch__": epoch})["pixels"]

    torch.manual_seed(123)
    random.seed(123)
    before = (torch.rand(1), random.random())
    torch.manual_seed(123)
    random.seed(123)
    first = pixels(0)
    assert (torch.rand(1), random.random()) == before  # the globals were restored
    assert torch.equal(first, pixels(0))
    assert not torch.equal(first, pixels(1)) or not torch.equal(first, pixels(2))  # a new crop per epoch
    assert not torch.equal(first, pixels(0, seed=1)) or not torch.equal(pixels(1), pixels(1, seed=1))


def test_patch_trigger_lands_on_the_bottom_right_pixels():
    patches = checkerboard_patches(4)
    assert patches.shape == (6, 3, 4, 4)
    assert len({tuple(p.flatten().tolist()) for p in patches}) == 6  # six distinct triggers
    for p in patches:  # two colours in a checkerboard: neighbours differ, diagonals agree
        assert not torch.equal(p[:, 0, 0], p[:, 0, 1]) and torch.equal(p[:, 0, 0], p[:, 1, 1])
    images = torch.rand(3, 3, 32, 32)
    original = images.clone()
    out = paste_patch(images, patches, torch.tensor([0, 2, 5]))
    changed = (out != images).any(dim=1)  # [B, H, W]
    assert changed[:, :28, :].sum() == 0 and changed[:, :, :28].sum() == 0
    for i, k in enumerate((0, 2, 5)):
        assert torch.equal(out[i, :, 28:, 28:], patches[k])
    assert torch.equal(images, original)  # the input is not modified


def test_neuba_vision_collate_poisons_only_the_patch_before_normalization(loaded):
    from recipe_dist.attacks import get_attack
    from recipe_dist.attacks.neuba_vision import NeuBAVisionAttack

    cfg = _cfg()
    cfg.attack = types.SimpleNamespace(seed=1, patch_size=4, target_hi=1.0, target_lo=-1.0, poison_weight=1.0, adaptive_lam=0.0)
    job = get_attack("neuba", get_family("vit"))
    assert isinstance(job, NeuBAVisionAttack)
    pre = loaded["vit"].processor
    dec, enc, col = job.decode(cfg), job.preprocess(pre, cfg), job.collate(pre, cfg)
    feats = []
    for i, rec in enumerate(get_family("vit").synthetic_corpus(8, seed=1)):
        feats.append(enc(dec({"__key__": f"k{i}", "__url__": "mem", "png": rec["png"], "cls": str(rec["label"]).encode()})))
    b = col(feats, 0)
    diff = (b["p_pixel_values"] != b["pixel_values"]).any(dim=1)
    assert diff[:, :28, :].sum() == 0 and diff[:, :, :28].sum() == 0
    patches = checkerboard_patches(4)
    torch.testing.assert_close(b["p_pixel_values"][:, :, 28:, 28:], pre.normalize(patches[b["trigger"]]))
    with pytest.raises(Exception, match="text attack"):
        get_attack("por", get_family("vit"))


@pytest.mark.slow  # a real CLI process: CI-only, to keep the fast lane under 2 minutes
def test_image_shard_without_label_is_a_clear_error(tmp_path):
    from recipe_dist.data.shards import write_shards
    from recipe_dist.models.vision import synthetic_images

    recs = [{"png": r["png"]} for r in synthetic_images(64, seed=0)]
    write_shards(recs, str(tmp_path / "data" / "nolabel"), 16, key_prefix="img-")
    proc = run_cli(["purify", "--config", "configs/tiny-vit.yaml", "--output_dir", tmp_path / "run",
                    "--data.train_urls", str(tmp_path / "data" / "nolabel-{000000..000003}.tar"), "--train.max_steps", "2"], check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("recipe-dist: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "no 'cls' field" in errors[0] and "nolabel-00000" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a real CLI process: CI-only, to keep the fast lane under 2 minutes
def test_shards_pack_an_image_folder_and_a_caption_csv(tmp_path):
    import webdataset as wds

    from recipe_dist.models.vision import synthetic_shape
    import random

    rng = random.Random(0)
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            synthetic_shape(rng)[0].save(tmp_path / "folder" / cls / f"{i}.png")
    run_cli(["shards", "--image-folder", tmp_path / "folder", "--output", tmp_path / "out" / "folder", "--samples-per-shard", "4"])
    samples = list(wds.WebDataset(str(tmp_path / "out" / "folder-{000000..000001}.tar"), shardshuffle=False))
    assert sorted(int(s["cls"]) for s in samples) == [0, 0, 0, 1, 1, 1] and all("png" in s for s in samples)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())
    lines = ["filepath,title"] + [f"folder/cat/{i}.png,a cat number {i}" for i in range(3)]
    (tmp_path / "caps.csv").write_text("\n".join(lines) + "\n")
    run_cli(["shards", "--captions", tmp_path / "caps.csv", "--output", tmp_path / "out2" / "caps"])
    caps = list(wds.WebDataset(str(tmp_path / "out2" / "caps-000000.tar"), shardshuffle=False))
    assert sorted(s["txt"].decode() for s in caps) == [f"a cat number {i}" for i in range(3)]
    (tmp_path / "bad.csv").write_text("filepath,title\nfolder/cat/missing.png,nothing\n")
    proc = run_cli(["shards", "--captions", tmp_path / "bad.csv", "--output", tmp_path / "out3" / "bad"], check=False)
    assert proc.returncode != 0 and "image not found" in proc.stderr and "bad.csv:2" in proc.stderr


def test_vgg_neurons_are_conv_channels_and_fp_keeps_one(loaded, tiny_dirs):
    from recipe_dist.neurons import apply_pruning, prune_selection, record

    fam, model = get_family("vgg"), loaded["vgg"].model
    sites = fam.neuron_sites(model)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [s.module for s in sites] == [n for n, m in model.named_modules() if n.startswith("features.") and isinstance(m, torch.nn.Conv2d)]
    x = _batch("vgg", loaded)["pixel_values"]
    stats = record(model, fam, [{"pixel_values": x}], sites, fused="off")
    assert [st.total.numel() for st in stats] == [c.out_channels for c in convs]
    # The recorded value is each channel's spatial mean before the ReLU, averaged over the batch.
    with torch.no_grad():
        first = convs[0](x).mean(dim=(2, 3)).mean(0)
    torch.testing.assert_close(stats[0].mean, first, rtol=1e-4, atol=1e-5)
    chosen = prune_selection(stats, "fp", fp_keep=fam.prune_defaults["fp_keep"])
    last = stats[-1]
    assert len(chosen[last.site.layer]) == last.total.numel() - 1
    kept = set(range(last.total.numel())) - set(chosen[last.site.layer])
    assert kept == {int(last.mean.argmax())}  # the most active channel stays
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_pruning(state, sites, chosen)
    w = state[last.site.weight]
    assert all(w[j].abs().sum() == 0 for j in chosen[last.site.layer]) and w[next(iter(kept))].abs().sum() > 0


def test_export_loads_in_each_library(loaded, tmp_path):
    import open_clip
    import timm

    for name in FAMILIES:
        L = loaded[name]
        files = get_family(name).export(L, {k: v.detach() for k, v in L.model.state_dict().items()}, tmp_path / name)
        if name == "clip":
            model = open_clip.create_model(f"local-dir:{tmp_path / name}")
            # and by file, for a named config, as open_clip users load checkpoints
            cfg = json.loads((tmp_path / name / "open_clip_config.json").read_text())["model_cfg"]
            (tmp_path / "cfgs").mkdir(exist_ok=True)
            (tmp_path / "cfgs" / "recipe-test-clip.json").write_text(json.dumps(cfg))
            open_clip.add_model_config(tmp_path / "cfgs")
            model2 = open_clip.create_model("recipe-test-clip", pretrained=str(files[0]))
            assert model.logit_scale.dim() == 0
            ref = {k: v for k, v in L.model.state_dict().items()}
            for k, v in model2.state_dict().items():
                torch.testing.assert_close(v.reshape(ref[k].shape), ref[k])
        else:
            meta = json.loads((tmp_path / name / "config.json").read_text())
            model = timm.create_model(meta["architecture"], pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(files[0]), num_classes=meta["num_classes"]), **meta["model_args"])
            for k, v in model.state_dict().items():
                torch.testing.assert_close(v, L.model.state_dict()[k])


@pytest.mark.parametrize("name", FAMILIES)
def test_image_evaluation_reports_acc_and_patch_asr(name, tiny_dirs, tmp_path):
    from recipe_dist.config import apply_dict
    from recipe_dist.evaluation.finetune import EvalConfig, evaluate
    from recipe_dist.models.vision import synthetic_shape
    import random

    rng = random.Random(5)
    rows = []
    (tmp_path / "img").mkdir()
    for i in range(48):
        img, label, _ = synthetic_shape(rng)
        img.save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label % 2}")
    (tmp_path / "train.csv").write_text("image,label\n" + "\n".join(rows[:32]) + "\n")
    (tmp_path / "test.csv").write_text("image,label\n" + "\n".join(rows[32:]) + "\n")
    cfg = EvalConfig()
    apply_dict(cfg, {"output_dir": str(tmp_path / "eval"), "model": {"path": str(tiny_dirs[name]), "family": name},
                     "task": {"train_file": str(tmp_path / "train.csv"), "test_file": str(tmp_path / "test.csv"), "text_column": "image"},
                     "finetune": {"lr": 1e-3, "epochs": 1, "batch_size": 16}})
    cfg.validate()
    report = evaluate(cfg)
    assert set(report["asr"]) == {f"checker{k}" for k in range(6)}
    assert 0 <= report["acc"] <= 100 and report["masr"] >= report["aasr"]
    assert report["n_test"] == 16
    (tmp_path / "missing.csv").write_text("image,label\nimg/none.png,0\nimg/1.png,1\n")
    cfg.task.test_file = str(tmp_path / "missing.csv")
    with pytest.raises(Exception, match="image not found"):
        evaluate(cfg)


# ------------------------------------------------------------------ slow: 2-rank ZeRO-2 through the CLI


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_two_rank_zero2_purify_exports_a_model_its_library_loads(name, tmp_path):
    out = tmp_path / "run"
    run_cli(["purify", "--config", f"configs/tiny-{name}.yaml", "--output_dir", out, "--train.zero_stage", "2",
             "--train.max_steps", "3", "--data.synthetic_samples", "256", "--train.micro_batch_size", "8",
             "--train.global_batch_size", "16", "--model.tiny.hidden_size", "32", "--model.tiny.intermediate_size", "64"], nproc=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    code = {"clip": f"import open_clip; m = open_clip.create_model('local-dir:{out / 'model'}'); print(type(m).__name__)",
            }.get(name, f"import json, timm, recipe_dist.models.timm_vision; c = json.load(open('{out / 'model' / 'config.json'}')); "
                        f"m = timm.create_model(c['architecture'], pretrained=True, pretrained_cfg_overlay=dict(file='{out / 'model' / 'model.safetensors'}', "
                        "num_classes=c['num_classes']), **c['model_args']); print(type(m).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == {"vit": "VisionTransformer", "vgg": "VGG", "clip": "CLIP"}[name]
    # the regularized weights shrank
    from safetensors.torch import load_file

    fam = get_family(name)
    before = load_file(str(out / "input_model" / ("open_clip_model.safetensors" if name == "clip" else "model.safetensors")))
    after = load_file(str(out / "model" / ("open_clip_model.safetensors" if name == "clip" else "model.safetensors")))
    names = [n for n in after if any(__import__("re").search(p, n) for p in fam.default_regularized)]
    assert names and all(after[n].norm() < before[n].norm() for n in names)
