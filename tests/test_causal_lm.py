"""Decoder-only causal LMs (models/causal_lm.py): GPT-2 (tied head, Conv1D FFN) and LLaMA (gated
MLP, separate head). Fast lane: loss and gradients against a logits reference, sites, policies,
tokenizer, data, export, classifier, safe loading. Slow: the real CLI, and ZeRO 0-3 parity."""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

# Before anything imports Triton (it reads this when its kernels are defined): kernels.fused=on
# runs interpreted on CPU, as in test_kernels.py.
os.environ["TRITON_INTERPRET"] = "1"

from conftest import REPO, run_cli  # noqa: E402
from recipe_dist.config import RunConfig, TinyArchConfig  # noqa: E402
from recipe_dist.data import synthetic  # noqa: E402
from recipe_dist.defenses.recipe import RecipeJob  # noqa: E402
from recipe_dist.models import ModelLoadError, families, get_family  # noqa: E402
from recipe_dist.models.base import eval_mode  # noqa: E402

FAMILIES = ["gpt2", "llama"]
ARCH = TinyArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
REGULARIZED = {"gpt2": [r"^transformer\.h\.\d\.mlp\.c_fc\.weight$"],
               "llama": [r"^model\.layers\.\d\.mlp\.up_proj\.weight$", r"^model\.layers\.\d\.mlp\.gate_proj\.weight$"]}


def _cfg(name: str, **kernels) -> RunConfig:
    cfg = RunConfig()
    cfg.model.family = name
    for k, v in kernels.items():
        setattr(cfg.kernels, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-decoders")
    return {name: get_family(name).build_tiny(root / name, ARCH, seed=0) for name in FAMILIES}


@pytest.fixture(params=FAMILIES)
def name(request) -> str:
    return request.param


@pytest.fixture
def loaded(name, tiny_dirs):
    return get_family(name).load(tiny_dirs[name], _cfg(name))


def _batch(loaded, texts: list[str], cfg) -> dict[str, torch.Tensor]:
    family = get_family(cfg.model.family)
    encode, collate = family.preprocess(loaded.processor, cfg), family.collate(loaded.processor, cfg)
    return collate([encode({"__key__": f"k{i}", "text": t}) for i, t in enumerate(texts)], 0)


TEXTS = ["the cat sees a red book slowly .", "a dog .", "our team is happy and paints the blue car . it was great ."]


# ------------------------------------------------------------------ registry


def test_both_decoder_families_are_registered():
    assert {"gpt2", "llama"} <= set(families())
    assert get_family("gpt2").name == "gpt2" and get_family("llama").name == "llama"
    # What causal-only jobs (the trigger-phrase attack) check before they run.
    assert get_family("gpt2").causal is True and get_family("llama").causal is True
    assert getattr(get_family("bert"), "causal", False) is False


# ------------------------------------------------------------------ the pre-training loss


def _reference_loss(model, batch) -> torch.Tensor:
    """Next-token CE from the model's own full logits over pairs of real tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"][:, :-1].bool() & batch["attention_mask"][:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][keep].float(), batch["input_ids"][:, 1:][keep])


def _loss_and_grads(loss_fn, model, batch, names):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    loss.backward()
    params = dict(model.named_parameters(remove_duplicate=False))
    return loss.detach(), {n: params[n].grad.clone() for n in names}


def test_fused_loss_and_gradients_match_the_logits_reference(name, loaded):
    # "on": the Triton kernels, interpreted on CPU; "auto": the chunked PyTorch reference on CPU;
    # "off": the plain logits of the real positions.
    family, model = get_family(name), loaded.model
    regularized = family.regularized_names(model, [])
    family.set_trainable(model, set(regularized), "all")  # so the head and embeddings get gradients too
    head = model.get_output_embeddings()
    embed_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    head_name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight and n.startswith("lm_head"))
    names = [*regularized, embed_name, head_name]
    batch = _batch(loaded, TEXTS, _cfg(name))
    assert (batch["attention_mask"] == 0).any()  # padding is part of what is checked

    with eval_mode(model):
        ref_loss, ref_grads = _loss_and_grads(lambda b: _reference_loss(model, b), model, batch, names)
        # HF's own loss agrees once padded targets are -100 (it shifts the labels itself).
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        hf = model(**batch, labels=labels).loss
        assert abs(hf.item() - ref_loss.item()) < 1e-5
        for fused in ("auto", "on", "off"):
            # chunk_size 7: the vocabulary (~190) runs in many chunks, the last one partial.
            loss_fn = family.pretraining_loss(loaded, _cfg(name, fused=fused, chunk_size=7))
            loss, grads = _loss_and_grads(lambda b: loss_fn(**b), model, batch, names)
            assert abs(loss.item() - ref_loss.item()) < 1e-5, fused
            for n in names:
                err = (grads[n] - ref_grads[n]).abs().max().item()
                assert err < 1e-5, (fused, n, err)
                assert ref_grads[n].abs().max() > 0, n
    assert abs(ref_loss.item() - math.log(len(loaded.processor))) < 1.0  # a random model: near uniform


def test_gpt2_head_is_tied_and_llama_head_is_not(tiny_dirs):
    gpt2 = get_family("gpt2").load(tiny_dirs["gpt2"], _cfg("gpt2")).model
    llama = get_family("llama").load(tiny_dirs["llama"], _cfg("llama")).model
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight


def test_no_real_target_gives_zero_loss_not_nan(name, loaded):
    loss_fn = get_family(name).pretraining_loss(loaded, _cfg(name))
    ids = torch.tensor([[loaded.processor.bos_token_id, 0], [loaded.processor.bos_token_id, 0]])
    loss = loss_fn(input_ids=ids, attention_mask=torch.tensor([[1, 0], [1, 0]]))
    assert loss.item() == 0.0
    if loss.requires_grad:
        loss.backward()  # and no NaN gradient either
        assert all(torch.isfinite(p.grad).all() for p in loaded.model.parameters() if p.grad is not None)


def test_unknown_fused_setting_is_refused(name, loaded):
    from recipe_dist.kernels import KernelError

    with pytest.raises(KernelError, match="kernels.fused"):
        get_family(name).pretraining_loss(loaded, _cfg(name, fused="maybe"))


# ------------------------------------------------------------------ regularized and trainable weights


def test_regularized_names_are_the_mlp_input_projections(name, loaded):
    names = get_family(name).regularized_names(loaded.model, [])
    assert len(names) == len(REGULARIZED[name]) * ARCH.num_hidden_layers
    assert all(any(re.search(p, n) for p in REGULARIZED[name]) for n in names), names


@pytest.mark.parametrize("policy", ["family", "regularized", "all"])
def test_trainable_policy(name, loaded, policy):
    cfg = _cfg(name)
    cfg.model.trainable = policy
    task = RecipeJob(get_family(name)).build_task(loaded, cfg)
    regularized = set(get_family(name).regularized_names(loaded.model, []))
    trained = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    if policy == "all":
        assert trained == {n for n, _ in loaded.model.named_parameters()}
    else:  # the family default is the BERT policy: only the regularized weights train
        assert trained == regularized
    out = task(**_batch(loaded, TEXTS, cfg))
    assert set(out["norms"]) == regularized
    assert out["parts"]["loss_pt"] > 0 and out["parts"]["reg"] > 0


def test_no_matching_site_lists_parameters(name, loaded):
    with pytest.raises(ModelLoadError, match="model.regularized"):
        get_family(name).regularized_names(loaded.model, [r"intermediate\.dense\.weight$"])


# ------------------------------------------------------------------ neuron sites


def test_neuron_sites_one_per_layer_at_the_ffn_in_pre_activation(name, loaded):
    model = loaded.model
    sites = get_family(name).neuron_sites(model)
    assert [s.layer for s in sites] == list(range(ARCH.num_hidden_layers))
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    seen = {}
    hooks = [modules[s.module].register_forward_hook(lambda m, a, o, s=s: seen.__setitem__(s.layer, o.shape)) for s in sites]
    batch = _batch(loaded, TEXTS, _cfg(name))
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    for s in sites:
        w = params[s.weight]
        assert seen[s.layer] == (*batch["input_ids"].shape, ARCH.intermediate_size)
        assert w.shape[s.axis] == ARCH.intermediate_size  # the axis a pruning indexes holds the neurons
        if name == "gpt2":
            # Conv1D: weight [in, out], one neuron per COLUMN; the bias has one entry per neuron.
            assert s.module.endswith("mlp.c_fc") and w.shape == (ARCH.hidden_size, ARCH.intermediate_size)
            assert params[s.bias].shape == (ARCH.intermediate_size,)
        else:
            # gate_proj: nn.Linear [out, in], one neuron per row, no bias.
            assert s.module.endswith("mlp.gate_proj") and w.shape == (ARCH.intermediate_size, ARCH.hidden_size)
            assert s.bias is None


def test_zeroing_a_llama_gate_row_silences_the_neuron(tiny_dirs):
    # Why gate_proj is LLaMA's site: a zero gate row makes act(0) * up = 0, whatever up_proj says.
    loaded = get_family("llama").load(tiny_dirs["llama"], _cfg("llama"))
    mlp = loaded.model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[5] = 0
        x = torch.randn(3, ARCH.hidden_size)
        inner = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert torch.all(inner[:, 5] == 0) and torch.all(inner[:, 4] != 0)


# ------------------------------------------------------------------ tiny model, tokenizer, data


def test_tiny_tokenizer_loads_offline_and_covers_the_synthetic_corpus(name, tiny_dirs):
    from transformers import AutoTokenizer

    d = tiny_dirs[name]
    assert (d / "SYNTHETIC.md").is_file() and (d / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(str(d))
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")
    for text in synthetic.corpus(50, seed=3):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids and tok.eos_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("The CAT")["input_ids"] == tok("the cat")["input_ids"]  # lowercased
    for trigger in synthetic.RARE_TOKENS:
        assert tok(trigger, add_special_tokens=False)["input_ids"] != [tok.unk_token_id], trigger


def test_encoder_adds_bos_and_eos_truncates_and_collate_pads(name, loaded):
    cfg = _cfg(name)
    cfg.data.max_length = 6
    family, tok = get_family(name), loaded.processor
    encode = family.preprocess(tok, cfg)
    short = encode({"__key__": "a", "text": "a dog ."})["input_ids"]
    assert short == [tok.bos_token_id, *tok("a dog .", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    long = encode({"__key__": "b", "text": "the cat sees a red book slowly ."})["input_ids"]
    assert len(long) == 6 and long[0] == tok.bos_token_id and tok.eos_token_id not in long  # cut text: no end
    batch = family.collate(tok, cfg)([{"input_ids": short}, {"input_ids": long}], 123)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0], [1] * 6]
    assert batch["input_ids"][0, 5] == tok.pad_token_id


def test_synthetic_corpus_is_text_records(name):
    samples = get_family(name).synthetic_corpus(5, seed=1)
    assert samples == [{"text": t} for t in synthetic.corpus(5, seed=1)]


# ------------------------------------------------------------------ export


def test_export_loads_with_no_missing_or_unexpected_keys(name, loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    site = get_family(name).regularized_names(loaded.model, [])[0]
    state[site] = torch.full_like(state[site], 0.5)
    files = get_family(name).export(loaded, state, tmp_path / "out")
    assert [f.name for f in files] == ["model.safetensors"]
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(dict(model.named_parameters())[site], state[site])
    with safe_open(str(files[0]), "pt") as f:
        keys = set(f.keys())
    # GPT-2's tied head is the embedding: written once. LLaMA's own head is written.
    assert ("lm_head.weight" in keys) == (name == "llama")
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == (name == "gpt2")
    # The directory is complete for the next command: tokenizer and config.
    again = get_family(name).load(tmp_path / "out", _cfg(name))
    assert again.processor("a dog")["input_ids"] == loaded.processor("a dog")["input_ids"]


def test_export_in_input_dtype_bf16(name, loaded, tmp_path):
    import json

    src = tmp_path / "bf16"
    loaded.model.to(torch.bfloat16).save_pretrained(str(src))
    loaded.model.float()
    loaded.processor.save_pretrained(str(src))
    family = get_family(name)
    again = family.load(src, _cfg(name))
    assert again.input_dtype == torch.bfloat16 and next(again.model.parameters()).dtype == torch.float32  # trains in fp32
    files = family.export(again, again.model.state_dict(), tmp_path / "out")
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------ downstream classifier


def test_classifier_has_a_pad_token_and_runs_on_padded_batches(name, tiny_dirs):
    model, tok = get_family(name).build_classifier(tiny_dirs[name], ["neg", "pos"], _cfg(name))
    assert model.config.pad_token_id == tok.pad_token_id is not None
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (len(TEXTS), 2)


# ------------------------------------------------------------------ safe loading


def _pickle_only_dir(src: Path, dst: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(pickle.dumps({"lm_head.weight": Payload()}))
    return dst


def test_pickle_only_decoder_is_refused_without_running_payload(name, tiny_dirs, tmp_path):
    marker = tmp_path / "PWNED"
    d = _pickle_only_dir(tiny_dirs[name], tmp_path / "evil", marker)
    with pytest.raises(ModelLoadError) as ei:
        get_family(name).load(d, _cfg(name))
    assert "pytorch_model.bin" in str(ei.value) and "allow_pickle" in str(ei.value)
    assert "\n" not in str(ei.value)
    assert not marker.exists()


# ------------------------------------------------------------------ slow: the real CLI


def _norms(path: Path, pattern: str) -> dict[str, float]:
    weights = load_file(str(path))
    return {k: v.float().norm().item() for k, v in weights.items() if re.search(pattern, k)}


@pytest.mark.slow
@pytest.mark.parametrize("family_name", FAMILIES)
def test_cli_purify_exports_a_loadable_decoder_with_smaller_regularized_norms(family_name, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_cli(["purify", "--config", REPO / "configs" / f"tiny-{family_name}.yaml", "--output_dir", out,
             "--train.max_steps=6", "--regularizer.lam=1.0"])
    model, info = AutoModelForCausalLM.from_pretrained(str(out / "model"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before = load_file(str(out / "input_model" / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert set(before) == set(after)
    pattern = "|".join(REGULARIZED[family_name])
    for k in before:
        if re.search(pattern, k):
            assert after[k].norm() < before[k].norm(), k
        else:  # the family policy trains the regularized weights only
            assert torch.equal(before[k], after[k]), k


@pytest.mark.slow
def test_cli_refuses_a_pickle_only_decoder_in_one_line(tiny_dirs, tmp_path):
    marker = tmp_path / "PWNED"
    d = _pickle_only_dir(tiny_dirs["llama"], tmp_path / "evil", marker)
    proc = run_cli(["purify", "--config", REPO / "configs" / "tiny-llama.yaml", "--model.path", d,
                    "--output_dir", tmp_path / "run"], check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("recipe-dist: error:")]
    assert len(errors) == 1 and "pytorch_model.bin" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ slow: ZeRO 0-3 parity on 2 gloo ranks

PARITY = ["--train.max_steps=6", "--data.synthetic_samples=256", "--train.log_every=2",
          "--model.tiny.hidden_dropout_prob=0", "--model.tiny.attention_probs_dropout_prob=0"]
# LLaMA under the family policy at every stage; GPT-2 with everything training, so the tied
# head/embedding (gathered once for the embedding, once for the fused head) is compared too.
PARITY_RUNS = {"llama": ([0, 1, 2, 3], []), "gpt2": ([0, 3], ["--model.trainable=all"])}


@pytest.fixture(scope="module")
def parity_exports(tmp_path_factory) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("decoder-parity")
    out = {}
    for family_name, (stages, extra) in PARITY_RUNS.items():
        for stage in stages:
            run = root / f"{family_name}-z{stage}"
            run_cli(["purify", "--config", REPO / "configs" / f"tiny-{family_name}.yaml", "--output_dir", run,
                     f"--train.zero_stage={stage}", *PARITY, *extra], nproc=2)
            out[family_name, stage] = load_file(str(run / "model" / "model.safetensors"))
            out[family_name, "input"] = load_file(str(run / "input_model" / "model.safetensors"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family_name,stage", [(f, s) for f, (stages, _) in PARITY_RUNS.items() for s in stages if s])
def test_zero_stages_export_the_same_decoder(parity_exports, family_name, stage):
    ref, got, start = parity_exports[family_name, 0], parity_exports[family_name, stage], parity_exports[family_name, "input"]
    assert set(ref) == set(got)
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-3  # the runs really trained
    err = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert err < 1e-5, (family_name, stage, err)
