"""Resuming a deepspeed-format checkpoint (full fine-tuning) at another world size, through DeepSpeed's
universal checkpoint (deepspeed/checkpoint/ds_to_universal.py; docs/recovery.md, "Formats").

`convert` turns every rank's ZeRO partitions into one folder per parameter (`zero/<name>/fp32.pt`,
`exp_avg.pt`, `exp_avg_sq.pt`) plus the optimizer's common state; `load` puts it into a stage-0 engine (one
rank: speed.effective_zero_stage turns ZeRO off there), which has no ZeRO optimizer for DeepSpeed's universal
loader: the whole tensors go straight into the module's parameters and the client optimizer's (torch AdamW)
state, the same three tensors and step DeepSpeed's loader would use.

Not a ZeRO engine (two or more ranks): DeepSpeed's universal loader (`checkpoint.load_universal`, read only
inside `load_checkpoint`, so it can be switched on for one load) was tried and measured wrong here — after a
2 -> 3 rank resume every norm weight (ZeRO-3 "persistent" parameters) ended one step 4e-4 away from the
uninterrupted run's (other weights within 5e-8; a fresh 3-rank run matches the 2-rank run to 4e-6), so
checkpoint.load_resized refuses that case (docs/recovery.md, "Not done yet").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

import torch

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


def loadable(engine: Any) -> bool:
    """Whether `load` can restore into this engine: no ZeRO, and torch AdamW's state (adamw_8bit keeps
    quantized moments that the universal format does not carry as exp_avg/exp_avg_sq)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return not engine.zero_optimization() and isinstance(inner, torch.optim.AdamW)


def load(engine: Any, folder: str) -> None:
    """Load the universal checkpoint `folder` (…/<tag>) into a stage-0 (one-rank) engine."""
    load_unpartitioned(engine.module, engine.optimizer, os.path.join(folder, ZERO))


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
