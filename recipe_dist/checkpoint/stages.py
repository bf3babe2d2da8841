"""Resuming a checkpoint under another ZeRO stage: 0 <-> 1 <-> 2 <-> 3, in every direction.

DeepSpeed (0.19) converts a ZeRO 1-3 checkpoint to its universal format (`ds_to_universal`) and
loads that with `load_universal`, but as shipped only 1 <-> 2 goes through (read from the
installed source, deepspeed/checkpoint/ds_to_universal.py, runtime/zero/stage3.py,
stage_1_and_2.py, engine.py, and checked by experiment):
- the stage-3 loader looks for `zero_pp_rank_0_mp_rank_00_model_states.pt` and for
  `optimizer_state_dict` in zero/optimizer_state.pt; a ZeRO-1/2 source has neither;
- the stage-1/2 loader wants each zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt as `{"param": t}`
  in the parameter's shape, a step.pt per parameter, `ds_version` and `clip_grad` in
  optimizer_state.pt, and `mp_rank_00_model_states.pt`; a ZeRO-3 source writes flat tensors and
  only the zero_pp_rank file;
- ZeRO-0 keeps the whole torch optimizer state in mp_rank_00_model_states.pt, which neither
  direction of the universal path reads or writes.
`complete_universal` fills in what each loader lacks, so one universal folder serves stages 1-3;
`zero0_to_universal` and `universal_to_zero0` translate to and from ZeRO-0's own layout. Model
weights, exp_avg, exp_avg_sq, the step, the scheduler and the counters carry over exactly (the
continuation differs from an uninterrupted run of the new stage by float rounding only, ~1e-8:
stage 0 and stage 3 runs already differ that much among themselves).

Limits: one parameter group (this project's optimizers have one); AdamW state (ds_to_universal
hard-codes exp_avg / exp_avg_sq), so SGD checkpoints are refused by the caller. Parameters the run
keeps frozen are not in the optimizer: on load they keep the values the model was built with,
which for a frozen parameter are the input model's, unchanged by training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .store import CheckpointError

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
MOMENTS = ("fp32", "exp_avg", "exp_avg_sq")


def _load(path: Path):
    return torch.load(path, map_location="cpu")  # inside weights_only_loads(): tensors and plain data only


def _model_states(folder: Path) -> Path:
    for name in (MODEL_STATES, ZERO3_MODEL_STATES):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*model_states.pt"))
    if not found:
        raise CheckpointError(f"resume: no model states file in {folder}")
    return found[0]


def _step(zero: Path):
    steps = sorted(zero.glob("*/step.pt"))
    if steps:
        return _load(steps[0])
    return _load(zero / "optimizer_state.pt")["optimizer_state_dict"]["state"][0]["step"]


def complete_universal(folder: Path) -> None:
    """Make a `ds_to_universal` output (from ZeRO 1, 2 or 3) loadable by the stage-1/2 and the
    stage-3 universal loaders alike."""
    import deepspeed

    zero = folder / "zero"
    states = _load(_model_states(folder))
    shapes = {k: v for group in states["param_shapes"] for k, v in group.items()}
    step = _step(zero)
    for name, shape in shapes.items():
        for key in MOMENTS:
            f = zero / name / f"{key}.pt"
            t = _load(f)
            if not isinstance(t, dict):  # the stage-3 writer's flat tensor
                torch.save({"param": t.view(shape)}, f)
        if not (zero / name / "step.pt").is_file():
            torch.save(step, zero / name / "step.pt")
    opt = _load(zero / "optimizer_state.pt")
    opt.setdefault("ds_version", deepspeed.__version__)
    opt.setdefault("clip_grad", states["ds_config"].get("gradient_clipping", 0.0))
    opt.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": opt["param_groups"]})
    torch.save(opt, zero / "optimizer_state.pt")
    source = _model_states(folder)
    for name in (MODEL_STATES, ZERO3_MODEL_STATES):
        if not (folder / name).is_file():
            shutil.copy2(source, folder / name)


def zero0_to_universal(src: Path, folder: Path, trainable: list[str]) -> None:
    """A ZeRO-0 checkpoint directory -> a universal folder that ZeRO 1-3 engines load."""
    import deepspeed

    states = _load(src / MODEL_STATES)
    opt, module = states.get("optimizer"), states["module"]
    if not opt or "state" not in opt:
        raise CheckpointError(f"resume: {src} holds no optimizer state to carry to another ZeRO stage")
    order = [i for group in opt["param_groups"] for i in group["params"]]
    if len(order) != len(trainable) or len(opt["param_groups"]) != 1:
        raise CheckpointError(f"resume: {src} has {len(order)} optimized tensors in {len(opt['param_groups'])} group(s); "
                              f"this run trains {len(trainable)} in one: keep model.trainable as it was")
    zero = folder / "zero"
    zero.mkdir(parents=True)
    first = opt["state"][order[0]]
    if "exp_avg" not in first:
        raise CheckpointError(f"resume: {src} holds no AdamW moments; only AdamW state moves between ZeRO stages")
    for i, name in zip(order, trainable):
        st, d = opt["state"][i], zero / name
        d.mkdir()
        torch.save({"param": module[name].float()}, d / "fp32.pt")
        torch.save({"param": st["exp_avg"]}, d / "exp_avg.pt")
        torch.save({"param": st["exp_avg_sq"]}, d / "exp_avg_sq.pt")
        torch.save(st["step"], d / "step.pt")
    groups = [dict(g) for g in opt["param_groups"]]
    torch.save({"param_groups": groups, "ds_version": deepspeed.__version__,
                "clip_grad": states.get("ds_config", {}).get("gradient_clipping", 0.0),
                "optimizer_state_dict": {"state": {0: {"step": first["step"]}}, "param_groups": groups}}, zero / "optimizer_state.pt")
    states["optimizer"] = None
    states["param_shapes"] = [{n: module[n].shape for n in trainable}]
    torch.save(states, folder / MODEL_STATES)
    torch.save(states, folder / ZERO3_MODEL_STATES)


def universal_to_zero0(folder: Path, target: Path, trainable: list[str], template: dict) -> None:
    """A universal folder -> a ZeRO-0 checkpoint directory (loaded as written). `template` is the
    freshly built module's state dict: buffers and frozen parameters (a ZeRO-3 source saves
    placeholders for them)."""
    states = _load(_model_states(folder))
    opt = _load(folder / "zero" / "optimizer_state.pt")
    step = _step(folder / "zero")
    if len(opt["param_groups"]) != 1:
        raise CheckpointError(f"resume: {folder} has {len(opt['param_groups'])} parameter groups; ZeRO-0 resume needs one")
    module, state = dict(template), {}

    def read(name: str, key: str) -> torch.Tensor:
        t = _load(folder / "zero" / name / f"{key}.pt")
        return (t["param"] if isinstance(t, dict) else t).reshape(template[name].shape).clone()

    for i, name in enumerate(trainable):
        if not (folder / "zero" / name).is_dir():
            raise CheckpointError(f"resume: {folder} holds no optimizer state for {name}: keep model.trainable as it was")
        module[name] = read(name, "fp32").to(template[name].dtype)
        state[i] = {"step": step.clone() if torch.is_tensor(step) else torch.tensor(float(step)),
                    "exp_avg": read(name, "exp_avg"), "exp_avg_sq": read(name, "exp_avg_sq")}
    group = dict(opt["param_groups"][0])
    group["params"] = list(range(len(trainable)))
    states.update(module=module, optimizer={"state": state, "param_groups": [group]},
                  param_shapes=None, frozen_param_shapes=None, shared_params=None, frozen_param_fragments=None)
    target.mkdir(parents=True)
    torch.save(states, target / MODEL_STATES)
