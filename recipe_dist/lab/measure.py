"""What `bench step` measures besides time: the machine's GEMM peak, a step's peak memory (CUDA
allocator or the C heap), and the useful FLOPs of a step, for MFU."""

from __future__ import annotations

import ctypes
import threading
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a sync point: the clock must see finished kernels


def gemm_peak(device: torch.device, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul: fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class _HeapPeak:
    """Peak of glibc's in-use heap bytes (mallinfo2) above its starting level, from a sampling thread."""

    def __init__(self):
        try:
            libc = ctypes.CDLL("libc.so.6")
            self._mallinfo2 = libc.mallinfo2
        except (OSError, AttributeError):
            self._mallinfo2 = None
        else:
            class _Info(ctypes.Structure):
                _fields_ = [(f, ctypes.c_size_t) for f in
                            ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

            self._mallinfo2.restype = _Info

    @property
    def available(self) -> bool:
        return self._mallinfo2 is not None

    def _now(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def measure(self, fn) -> int:
        base = self._now()
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self._now())
                time.sleep(0.0005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            fn()
        finally:
            done.set()
            th.join()
        peak[0] = max(peak[0], self._now())
        return peak[0] - base


def peak_step_memory(device: torch.device, fn) -> int | None:
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    heap = _HeapPeak()
    return heap.measure(fn) if heap.available else None


# --------------------------------------------------------------------------------------------
# Useful FLOPs


def useful_flops(hf_cfg, trainable: set[str], batch: int, length: int, n_labelled: float) -> dict:
    """Matmul FLOPs one RECIPE step must do (see the module docstring), by part."""
    t, h, i, v = batch * length, hf_cfg.hidden_size, hf_cfg.intermediate_size, hf_cfg.vocab_size
    attn = 2 * batch * length * length * h  # QK^T, and again P @ V, summed over heads
    fwd = bwd_act = bwd_w = 0.0
    prefix = "bert.encoder.layer"
    rg = any(n.startswith("bert.embeddings.") for n in trainable)  # does the layer input need a grad?
    for layer in range(hf_cfg.num_hidden_layers):
        def tr(part: str) -> bool:
            return f"{prefix}.{layer}.{part}.weight" in trainable

        q, k, vv, o = tr("attention.self.query"), tr("attention.self.key"), tr("attention.self.value"), tr("attention.output.dense")
        inter, out = tr("intermediate.dense"), tr("output.dense")
        fwd += 2 * t * (4 * h * h + 2 * h * i) + 2 * attn
        # activation gradients, op by op, where the op's input carries a gradient
        q_rg, k_rg, v_rg = q or rg, k or rg, vv or rg
        bwd_act += 2 * t * h * h * (3 * rg)                               # q, k, v inputs
        bwd_act += attn * (q_rg + k_rg) + attn * ((q_rg or k_rg) + v_rg)  # scores, context
        ctx_rg = q_rg or k_rg or v_rg
        bwd_act += 2 * t * h * h * ctx_rg                                # attention output dense
        inter_in_rg = o or ctx_rg or rg                                  # residual carries rg
        bwd_act += 2 * t * h * i * inter_in_rg                           # intermediate dense
        out_in_rg = inter or inter_in_rg
        bwd_act += 2 * t * i * h * out_in_rg                             # output dense
        rg = out or out_in_rg
        bwd_w += 2 * t * h * h * (q + k + vv + o) + 2 * t * h * i * (inter + out)
    head_t = any(n.startswith("cls.predictions.transform.dense") for n in trainable)
    dec = "bert.embeddings.word_embeddings.weight" in trainable or "cls.predictions.decoder.weight" in trainable
    n = n_labelled
    fwd_head = 2 * n * h * h + 2 * n * h * v
    bwd_head = 2 * n * h * h * rg + 2 * n * h * v * (rg or head_t) + 2 * n * h * h * head_t + 2 * n * h * v * dec
    total = fwd + bwd_act + bwd_w + fwd_head + bwd_head
    return {"total": total, "encoder_forward": fwd, "encoder_backward_activations": bwd_act,
            "encoder_backward_weights": bwd_w, "head": fwd_head + bwd_head}


# --------------------------------------------------------------------------------------------
# The two steps
