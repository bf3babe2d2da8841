"""Run under torchrun with 2 processes: RECIPE under ZeRO stages 0-3 against single-process references.

Writes {stage: {...}} to argv[2]; the test (test_zero_parity.py) asserts on it. argv[1] is a tiny
BERT directory built by the test.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import get_scheduler

from recipe_dist.defenses.recipe import RecipeJob
from recipe_dist.config import RunConfig, deepspeed_config
from recipe_dist.distributed import init_distributed
from recipe_dist.models import get_family
from recipe_dist.checkpoint import Checkpointer

MODEL = Path(sys.argv[1])
OUT = Path(sys.argv[2])
MICRO, STEPS = 4, 3


def make_cfg(**over):
    cfg = RunConfig()
    cfg.train.micro_batch_size = MICRO
    cfg.train.global_batch_size = MICRO * dist.get_world_size()
    for k, v in over.items():
        sec, key = k.split("__")
        setattr(getattr(cfg, sec), key, v)
    return cfg


def global_batches(vocab: int, n: int):
    """n global batches of 2*MICRO sequences with ~15% labelled positions, identical on every rank."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (2 * MICRO, 12), generator=g)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, torch.randint(5, vocab, ids.shape, generator=g), -100)
        labels[:, 3] = ids[:, 3]  # every row has at least one label
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def rank_slice(batch, rank):
    return {k: v[rank * MICRO : (rank + 1) * MICRO] for k, v in batch.items()}


def fresh_task(cfg):
    fam = get_family("bert")
    loaded = fam.load(MODEL, cfg)
    return RecipeJob(fam).build_task(loaded, cfg)


def consolidated(engine, cfg, module):
    info = type("D", (), {"is_main": dist.get_rank() == 0})()
    return Checkpointer(cfg, Path("."), info, "", data=None).consolidated_state(engine, module)  # export only: no data part


def main():
    info = init_distributed()
    rank = info.rank
    results = {}
    for stage in (0, 1, 2, 3):
        res = {}
        # --- one SGD step with only the regularizer -------------------------------------
        cfg = make_cfg(train__zero_stage=stage, optim__name="sgd", optim__lr=0.1, regularizer__pt_weight=0.0,
                       regularizer__lam=1.0, train__grad_clip=1e6)
        task = fresh_task(cfg)
        names = task.collector.names
        w0 = {n: p.detach().clone() for n, p in task.loss.model.named_parameters() if n in names}
        engine, *_ = deepspeed.initialize(model=task, model_parameters=[p for p in task.parameters() if p.requires_grad],
                                          config=deepspeed_config(cfg, info.world_size))
        vocab = task.loss.model.config.vocab_size
        # What a norm taken outside the owning module's forward would see (ZeRO-3: a placeholder).
        res["outside_forward_numel"] = dict(task.loss.model.named_parameters())[names[0]].numel()
        res["full_numel"] = w0[names[0]].numel()
        b = {k: v.to(engine.device) for k, v in rank_slice(global_batches(vocab, 1)[0], rank).items()}
        out = engine(**b)
        engine.backward(out["loss"])
        engine.step()
        state = consolidated(engine, cfg, task.loss.model)
        if rank == 0:
            expect_reg = sum(torch.linalg.vector_norm(w).item() for w in w0.values())
            res["reg_value_err"] = abs(out["parts"]["reg"].item() - expect_reg)
            res["reg_only_max_diff"] = max(
                (state[n] - (w - 0.1 * 1.0 * w / torch.linalg.vector_norm(w))).abs().max().item() for n, w in w0.items()
            )
            res["reg_only_moved"] = max((state[n] - w).abs().max().item() for n, w in w0.items())
        del engine, task

        # --- a few AdamW steps of the full objective, all parameters training ---------------
        cfg = make_cfg(train__zero_stage=stage, optim__name="adamw", optim__lr=1e-3, train__grad_clip=1.0,
                       model__trainable="all", regularizer__lam=1.0)
        task = fresh_task(cfg)
        engine, *_ = deepspeed.initialize(
            model=task, model_parameters=[p for p in task.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, info.world_size),
            lr_scheduler=lambda opt: get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=STEPS),
        )
        batches = global_batches(vocab, STEPS)
        for gb in batches:
            out = engine(**{k: v.to(engine.device) for k, v in rank_slice(gb, rank).items()})
            engine.backward(out["loss"])
            engine.step()
        state = consolidated(engine, cfg, task.loss.model)
        if rank == 0:
            # Reference: one process, plain PyTorch, the two rank slices as accumulated micro-batches.
            ref = fresh_task(cfg)
            params = [p for p in ref.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=STEPS)
            for gb in batches:
                for r in range(2):
                    (ref(**rank_slice(gb, r))["loss"] / 2).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
            ref_state = ref.loss.model.state_dict()
            res["full_max_diff"] = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
            res["full_moved"] = max((ref_state[k] - v).abs().max().item() for k, v in fresh_task(cfg).loss.model.state_dict().items())
        del engine, task
        results[stage] = res
    if rank == 0:
        OUT.write_text(json.dumps(results, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
