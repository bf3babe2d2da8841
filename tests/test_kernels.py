"""Kernels: the chunked reference against full logits, the Triton kernels against the reference under
TRITON_INTERPRET=1 (forward and backward, odd shapes), the kernels.fused switch inside a purify
step, and `recipe-dist bench step --preset tiny`."""

import os

# RECIPE_DIST_TEST_DEVICE=cuda (launch/gpu-check.sh): the Triton tests run compiled on the GPU.
# Otherwise, before anything imports triton: the kernels run in Triton's interpreter on CPU.
DEVICE = os.environ.get("RECIPE_DIST_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import REPO, run_cli  # noqa: E402
from recipe_dist.defenses.recipe import RecipeJob
from recipe_dist.config import ConfigError, RunConfig, load_config  # noqa: E402
from recipe_dist.kernels import (  # noqa: E402
    KernelError,
    activation_stats,
    chunked_linear_cross_entropy,
    fused_linear_cross_entropy,
    reference_activation_stats,
    use_fused,
)
from recipe_dist.models import get_family  # noqa: E402

import triton  # noqa: E402,F401  (a dependency: its absence must fail here, not skip)


def naive_ce(h, w, b, t):
    """The unfused definition: full logits, F.cross_entropy, sum / N (0 with no rows)."""
    z = F.linear(h, w, b).float()
    return F.cross_entropy(z, t, reduction="sum") / t.numel() if t.numel() else z.sum() * 0.0


def _inputs(n, h, v, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return hid, w, b, t


def _loss_and_grads(fn, hid, w, b, t, scale=1.3):
    leaves = [x for x in (hid, w, b) if x is not None]
    loss = fn(hid, w, b, t)
    # a non-unit upstream gradient, as a weighted sum in the real objective gives
    grads = torch.autograd.grad(loss * scale, leaves)
    return loss.detach(), grads


def _assert_close(a, b, tol):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la.float(), lb.float(), atol=tol, rtol=tol), (la, lb)
    for x, y in zip(ga, gb):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.allclose(x.float(), y.float(), atol=tol, rtol=tol), (x.float() - y.float()).abs().max()


# (N, H, V, chunk, bias): vocab not a multiple of the chunk or the kernel's block, hidden not a
# power of two, a single row, no rows at all.
SHAPES = [(37, 24, 101, 32, True), (64, 32, 256, 64, False), (1, 40, 77, 16, True), (0, 24, 50, 16, True), (70, 48, 333, 100, True)]


@pytest.mark.parametrize("n,h,v,chunk,bias", SHAPES)
def test_reference_matches_full_logits(n, h, v, chunk, bias):
    args = _inputs(n, h, v, bias)
    ref = _loss_and_grads(lambda *a: chunked_linear_cross_entropy(*a, chunk=chunk), *args)
    _assert_close(ref, _loss_and_grads(naive_ce, *args), 1e-5)
    if n == 0:
        assert ref[0].item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in ref[1])


@pytest.mark.parametrize("n,h,v,chunk,bias", SHAPES)
def test_triton_matches_reference_fp32(n, h, v, chunk, bias):
    args = _inputs(n, h, v, bias, seed=1)
    ref = _loss_and_grads(lambda *a: chunked_linear_cross_entropy(*a, chunk=chunk), *args)
    tri = _loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, chunk=chunk, fused=True), *args)
    _assert_close(tri, ref, 1e-5)


def test_triton_matches_reference_bf16():
    args = _inputs(45, 40, 150, True, dtype=torch.bfloat16, seed=2)
    ref = _loss_and_grads(lambda *a: chunked_linear_cross_entropy(*a, chunk=64), *args)
    tri = _loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, chunk=64, fused=True), *args)
    # bf16 rounds logits and gradients to 8 bits of mantissa; both sides round the same values.
    _assert_close(tri, ref, 2e-2)
    _assert_close(ref, _loss_and_grads(naive_ce, *args), 2e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_weight_gets_no_gradient_work(fused):
    hid, w, b, t = _inputs(20, 16, 40, True)
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = fused_linear_cross_entropy(hid, w, b, t, chunk=16, fused=fused)
    (g,) = torch.autograd.grad(loss, [hid])
    ref = torch.autograd.grad(naive_ce(hid, w, b, t), [hid])[0]
    assert torch.allclose(g, ref, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5, 300), (33, 300), (1, 3, 17), (0, 4, 8)])
def test_activation_stats_triton_matches_reference(shape):
    x = torch.randn(*shape).to(DEVICE)
    s_ref, c_ref = reference_activation_stats(x)
    s, c = activation_stats(x, fused=True)
    assert torch.allclose(s, s_ref, atol=1e-5) and torch.equal(c, c_ref)
    first = x[:, 0] if x.dim() == 3 else x
    assert torch.allclose(s_ref, first.sum(0), atol=1e-5) and torch.equal(c_ref, (first > 0).sum(0))


def test_activation_stats_bf16():
    x = torch.randn(9, 4, 70).bfloat16().to(DEVICE)
    s_ref, c_ref = reference_activation_stats(x)
    s, c = activation_stats(x, fused=True)
    assert torch.allclose(s, s_ref, atol=1e-2) and torch.equal(c, c_ref)


# ------------------------------------------------------------------ the switch


def test_switch_resolution(monkeypatch):
    assert use_fused("cpu", "auto") is False  # the reference off CUDA
    assert use_fused("cpu", "off") is False
    assert use_fused("cpu", "on") is True  # TRITON_INTERPRET=1 in this module
    with pytest.raises(KernelError, match="hidden sizes"):
        use_fused("cpu", "on", hidden_size=4096)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET"):
        use_fused("cpu", "on")
    with pytest.raises(KernelError, match="kernels.fused"):
        use_fused("cpu", "fast")
    with pytest.raises(ConfigError, match="kernels.fused"):
        load_config(None, ["--kernels.fused=fast"])
    assert load_config(None, ["--kernels.fused=off"]).kernels.fused == "off"


def _task(tiny_dir, fused: str, trainable: str = "all"):
    cfg = RunConfig()
    cfg.kernels.fused = fused
    cfg.kernels.chunk_size = 64  # the tiny vocabulary spans several chunks
    cfg.model.trainable = trainable
    fam = get_family("bert")
    loaded = fam.load(tiny_dir, cfg)
    return RecipeJob(fam).build_task(loaded, cfg)


def _batch(masked: str):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 60, (4, 12), generator=g)
    if masked == "some":
        labels = torch.where(torch.rand(4, 12, generator=g) < 0.3, ids, -100)
    elif masked == "all":
        labels = ids.clone()
    else:
        labels = torch.full_like(ids, -100)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _purify_step(task, batch):
    """One step of the purify objective: loss, backward, clip at 1.0, an optimizer step.

    SGD, not AdamW: Adam's first step is lr * g / (|g| + eps), which turns 1e-10 differences in
    near-zero gradients into 1e-4 differences in the weights whatever computed them.
    """
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    out = task(**batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return out, grads, {n: p.detach().clone() for n, p in task.named_parameters()}


@pytest.mark.parametrize("masked", ["some", "all", "none"])
def test_fused_and_reference_paths_agree_in_a_purify_step(tiny_bert_dir, masked):
    batch = _batch(masked)
    runs = {f: _purify_step(_task(tiny_bert_dir, f), batch) for f in ("off", "auto", "on")}
    out0, grads0, params0 = runs["off"]
    if masked == "none":
        assert out0["parts"]["loss_pt"].item() == 0.0
    for f in ("auto", "on"):
        out, grads, params = runs[f]
        assert torch.isfinite(out["loss"]) and abs(out["loss"].item() - out0["loss"].item()) < 1e-5, f
        assert set(grads) == set(grads0), f  # the tied embedding/decoder gets its gradient on every path
        for n, g in grads0.items():
            assert torch.allclose(grads[n], g, atol=1e-5, rtol=1e-5), (f, n, (grads[n] - g).abs().max())
        for n, p in params0.items():
            assert torch.allclose(params[n], p, atol=1e-5), (f, n)


def test_tied_decoder_stays_tied(tiny_bert_dir):
    task = _task(tiny_bert_dir, "on")
    model = task.loss.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _purify_step(task, _batch("some"))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "forward" not in model.get_output_embeddings().__dict__  # the swapped forward is restored


@pytest.mark.slow  # end-to-end: CI runs it, the fast lane leaves it out
def test_purify_cli_fused_on_and_off_write_the_same_model(tiny_bert_dir, tmp_path):
    """The real purify path (DeepSpeed engine, shards, export) under both settings."""
    common = ["purify", "--config", REPO / "configs" / "tiny-bert.yaml", "--model.path", tiny_bert_dir,
              "--model.trainable=all", "--data.synthetic_samples=96", "--train.micro_batch_size=16",
              "--train.global_batch_size=16", "--train.max_steps=3", "--train.log_every=1", "--kernels.chunk_size=64"]
    outs = {}
    for fused in ("off", "on"):
        outs[fused] = tmp_path / fused
        run_cli([*common, "--output_dir", outs[fused], f"--kernels.fused={fused}"], env={"TRITON_INTERPRET": "1"})
    a, b = (load_file(str(outs[f] / "model" / "model.safetensors")) for f in ("off", "on"))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    sa, sb = (json.loads((outs[f] / "summary.json").read_text()) for f in ("off", "on"))
    assert abs(sa["final_loss_pt"] - sb["final_loss_pt"]) < 1e-5


_ZERO3 = r"""
import os, sys, json, pathlib, torch
import deepspeed, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from recipe_dist.config import RunConfig
from recipe_dist.models import get_family
from recipe_dist.defenses.recipe import RecipeJob
fam, res = get_family("bert"), {}
for fused in ("off", "auto", "on"):
    cfg = RunConfig(); cfg.kernels.fused = fused; cfg.model.trainable = "all"; cfg.kernels.chunk_size = 64
    task = RecipeJob(fam).build_task(fam.load(pathlib.Path(sys.argv[1]), cfg), cfg)
    ds = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                                                 "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}
    eng, *_ = deepspeed.initialize(model=task, model_parameters=[p for p in task.parameters() if p.requires_grad], config=ds)
    emb = task.loss.model.get_input_embeddings().weight
    assert emb.numel() == 0, "the tied embedding should be partitioned outside the forward"
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 60, (4, 12), generator=g)
    labels = torch.where(torch.rand(4, 12, generator=g) < 0.3, ids, -100)
    out = eng(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    eng.backward(out["loss"]); eng.step()
    with deepspeed.zero.GatheredParameters(list(task.parameters())):
        res[fused] = {"loss": out["loss"].item(), "params": {n: p.detach().clone() for n, p in task.named_parameters()}}
diff = {f: max((res[f]["params"][n] - p).abs().max().item() for n, p in res["off"]["params"].items()) for f in ("auto", "on")}
print("RESULT", json.dumps({"loss": {f: r["loss"] for f, r in res.items()}, "param_diff": diff}))
"""


@pytest.mark.slow  # end-to-end: CI runs it, the fast lane leaves it out
def test_zero3_partitioned_decoder_fused_paths_agree(tiny_bert_dir, tmp_path):
    """ZeRO-3 with every parameter partitioned and released after use (the tied decoder weight is an
    empty placeholder outside the forward): one engine step is the same under off, auto and on."""
    import subprocess
    import sys

    from conftest import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _ZERO3, str(tiny_bert_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    for f in ("auto", "on"):
        assert abs(res["loss"][f] - res["loss"]["off"]) < 1e-5, res
        assert res["param_diff"][f] < 1e-5, res


# ------------------------------------------------------------------ bench step


def test_bench_step_tiny_prints_figures(tmp_path):
    out = tmp_path / "step.json"
    proc = run_cli(["bench", "step", "--preset", "tiny", "--json", out])
    for needle in ("GEMM peak", "reference step", "recipe-dist step", "speedup vs reference", "useful-FLOP utilisation",
                   "regularizer share", "peak step memory"):
        assert needle in proc.stdout, needle
    res = json.loads(out.read_text())
    for key in ("reference_samples_per_s", "samples_per_s", "speedup_vs_reference", "useful_flop_utilization",
                "reg_overhead_fraction", "gemm_peak_flops", "device"):
        assert key in res, key
    # Timing-derived figures are reported, never bounded here (a loaded machine may give any value).
    assert res["device"] == "cpu"
    assert all(math.isfinite(res[k]) for k in ("gemm_peak_flops", "reg_overhead_fraction", "useful_flop_utilization"))
    assert res["loss_max_abs_diff"] < 1e-4  # same weights, batches and masks: the same losses


@pytest.mark.slow
def test_bench_memory_tiny_zero3_halves_params_and_optimizer_state(tmp_path):
    out = tmp_path / "memory.json"
    proc = run_cli(["bench", "memory", "--preset", "tiny", "--json", out])
    assert "ZeRO-3 / ZeRO-0 per rank" in proc.stdout
    res = json.loads(out.read_text())
    z0, z3 = res["zero0"], res["zero3"]
    assert z0["params"] > 0 and z0["optimizer"] > 0 and z3["params"] > 0 and z3["optimizer"] > 0
    assert res["zero3_over_zero0"] <= 0.55, res  # 2 ranks: each holds about half


def test_gpu_check_script_prints_its_plan_without_a_gpu():
    import subprocess

    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu-check.sh"), "--dry-run"], capture_output=True, text=True, check=True)
    for step in ("kernels:", "RECIPE_DIST_TEST_DEVICE=cuda", "bench step --preset bert-base --device cuda --precision bf16", "purify:"):
        assert step in proc.stdout
