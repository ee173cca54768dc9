"""Resuming a deepspeed-format checkpoint (full fine-tuning) at another world size, through DeepSpeed's
universal checkpoint (deepspeed/checkpoint/ds_to_universal.py; docs/recovery.md, "Formats").

`convert` turns every rank's ZeRO partitions into one folder per parameter (`zero/<name>/fp32.pt`,
`exp_avg.pt`, `exp_avg_sq.pt`) plus the optimizer's common state. A checkpoint of one rank without ZeRO
(stage 0) has no partitions: DeepSpeed's model-states file holds the whole module and the torch optimizer's
state_dict, and `convert_unpartitioned` writes the same layout from it (the parameter names in the
optimizer's order are recorded at save: `OPTIMIZER_PARAM_NAMES`). `load` puts either into the engine:
  - a ZeRO engine (stage >= 1, i.e. more than one rank): DeepSpeed's own universal loading, switched on for
    this one load (`checkpoint.load_universal` is read only inside `load_checkpoint`, never at initialize),
    each rank slicing its new partition out of the whole tensors; two of its slips are undone after the load
    (every group given the first group's hyper-parameters, e.g. weight decay; one `step` tensor shared by
    every group: `unshare_steps`);
  - a stage-0 engine (one rank: speed.effective_zero_stage turns ZeRO off there) has no ZeRO optimizer for
    DeepSpeed to load into, so the whole tensors go straight into the module's parameters and the client
    optimizer's (torch AdamW) state, the same three tensors and step DeepSpeed's loader would use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

import torch

from sftjob_api.exit_codes import PermanentError

ZERO = "zero"


def convert(src: str, out: str) -> None:
    """DeepSpeed's conversion, in this process (one worker: no process pool inside a torchrun rank); its
    progress lines go to stderr, stdout carries the trainer's JSON events."""
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(
        input_folder=src,
        output_folder=out,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(sys.stderr):
        main(args)


# DeepSpeed's model-states file of a rank without ZeRO (stage 0), and the key our save adds to it
UNPARTITIONED = "mp_rank_00_model_states.pt"
OPTIMIZER_PARAM_NAMES = "sftjob_optimizer_param_names"
_ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # what ZeRO-3's universal loader globs


def optimizer_param_names(module: torch.nn.Module, optimizer: Any) -> list[str] | None:
    """The module's name of each parameter in the optimizer's state_dict order (torch numbers them group by
    group): saved with a stage-0 checkpoint, so that its state can be named per parameter later. None where
    the optimizer steps other tensors (bf16: DeepSpeed's fp32 partitions, which ds_to_universal converts)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    by_id = {id(p): n for n, p in module.named_parameters()}
    names = [by_id.get(id(p)) for g in opt.param_groups for p in g["params"]]
    return None if None in names else [n for n in names if n is not None]


def client_state(engine: Any) -> dict[str, Any]:
    """What a deepspeed-format save adds to DeepSpeed's model-states file: without ZeRO (one rank, fp32)
    the parameter names in the optimizer's order, which nothing else records (`convert_unpartitioned`)."""
    names = None if engine.zero_optimization() else optimizer_param_names(engine.module, engine.optimizer)
    return {} if names is None else {OPTIMIZER_PARAM_NAMES: names}


def convert_unpartitioned(src: str, out: str) -> None:
    """The universal layout (as `convert` writes it) from a checkpoint of one rank without ZeRO: each
    parameter's weights (the module's, fp32: the engine's master copy) and torch AdamW's moments, the
    optimizer's step and param groups, and the model-states file (LR scheduler, counters) under the name
    ZeRO-3's universal loader reads. Every tensor is copied, nothing recomputed."""
    sd = torch.load(os.path.join(src, UNPARTITIONED), map_location="cpu", weights_only=False)
    names, osd = sd.get(OPTIMIZER_PARAM_NAMES), sd.get("optimizer")
    if not names or not osd:  # e.g. written before the names were recorded: it resumes at its own size
        raise PermanentError(
            f"{UNPARTITIONED} lacks the optimizer state or {OPTIMIZER_PARAM_NAMES}: this one-rank checkpoint"
            " resumes on one rank only"
        )
    order = [i for g in osd["param_groups"] for i in g["params"]]
    if len(order) != len(names):
        raise PermanentError(
            f"{UNPARTITIONED}: {len(names)} parameter names for {len(order)} optimizer entries"
        )
    for i, name in zip(order, names, strict=True):
        d = os.path.join(out, ZERO, name)
        os.makedirs(d)
        state = osd["state"][i]
        weights = sd["module"][name].float()
        for key, t in (("fp32", weights), ("exp_avg", state["exp_avg"]), ("exp_avg_sq", state["exp_avg_sq"])):
            if t.shape != weights.shape:
                raise PermanentError(
                    f"{name}: {key} has shape {tuple(t.shape)}, the weights {tuple(weights.shape)}"
                )
            torch.save({"param": t.float()}, os.path.join(d, f"{key}.pt"))
    step = osd["state"][order[0]]["step"]
    common = {"optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": osd["param_groups"]}}
    torch.save(common, os.path.join(out, ZERO, "optimizer_state.pt"))
    rest = {k: v for k, v in sd.items() if k not in ("optimizer", "module")}
    torch.save({**rest, "module": None}, os.path.join(out, _ZERO3_MODEL_STATES))


def loadable(engine: Any) -> bool:
    """Whether `load` can restore into this engine's optimizer: torch AdamW's state (adamw_8bit keeps
    quantized moments that the universal format does not carry as exp_avg/exp_avg_sq)."""
    return isinstance(getattr(engine.optimizer, "optimizer", engine.optimizer), torch.optim.AdamW)


def zero3(engine: Any) -> bool:
    """Whether the engine partitions its parameters (ZeRO-3): the loader `convert_unpartitioned` writes for."""
    return bool(engine.zero_optimization_partition_weights())


def load(engine: Any, folder: str, strict: bool) -> None:
    """Load the universal checkpoint `folder` (…/<tag>) into `engine` at this run's world size."""
    if engine.zero_optimization():
        cfg = engine._config  # DeepSpeed has no per-call switch; this attribute is what load_checkpoint reads
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        cfg.load_universal_checkpoint = True
        try:
            path, _ = engine.load_checkpoint(
                os.path.dirname(folder),
                tag=os.path.basename(folder),
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=strict,
            )
        finally:
            cfg.load_universal_checkpoint = False
        # DeepSpeed's ZeRO-3 universal loader copies the first group's hyper-parameters into every group,
        # which would decay the no-decay group (norms, biases); the spec's own values are the ones to keep
        for group, h in zip(inner.param_groups, hyper, strict=True):
            group.update(h)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {folder}")
        unshare_steps(inner)
        return
    load_unpartitioned(engine.module, engine.optimizer, os.path.join(folder, ZERO))


def unshare_steps(inner: Any) -> None:
    """DeepSpeed's ZeRO-3 universal loader gives every sub-group's Adam state the *same* `step` tensor, which
    torch's AdamW then increments in place once per sub-group and step: from the second group on (the
    no-decay group: norms, biases) the bias correction ran a step ahead (measured: norms 4e-4 off after one
    step at 2 -> 3 ranks, an update 14% too small, exactly Adam's step-3 vs step-2 correction)."""
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _tensor(path: str) -> torch.Tensor:
    # files this process just wrote from hash-verified inputs (the conversion itself unpickles those)
    d = torch.load(path, map_location="cpu", weights_only=False)
    t = d["param"] if isinstance(d, dict) else d
    assert isinstance(t, torch.Tensor), path
    return t


def load_unpartitioned(module: torch.nn.Module, optimizer: Any, zero_dir: str) -> None:
    """Stage 0: every parameter whole, into the module and the torch optimizer's Adam state."""
    common = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), map_location="cpu", weights_only=False)
    step = common["optimizer_state_dict"]["state"][0]["step"]
    opt = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed may wrap the client optimizer
    by_param = {id(p): n for n, p in module.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = by_param.get(id(p))
            if name is None:  # e.g. bf16: the optimizer holds fp32 copies, not the module's parameters
                raise RuntimeError("resuming at another world size on one rank needs an fp32 engine")
            d = os.path.join(zero_dir, name)
            if not os.path.isdir(d):
                raise RuntimeError(f"the universal checkpoint lacks parameter {name}")
            with torch.no_grad():
                p.copy_(_tensor(os.path.join(d, "fp32.pt")).view_as(p))
            opt.state[p] = {
                "step": torch.as_tensor(step, dtype=torch.float32).clone(),
                "exp_avg": _tensor(os.path.join(d, "exp_avg.pt")).view_as(p).clone(),
                "exp_avg_sq": _tensor(os.path.join(d, "exp_avg_sq.pt")).view_as(p).clone(),
            }
