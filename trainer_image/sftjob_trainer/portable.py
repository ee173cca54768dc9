"""World-size-independent training state of an adapter run, and RNG state, without pickles.

The trainable parameters (LoRA matrices, modulesToSave) are small: each is gathered whole, in fp32, with its
Adam moments, through DeepSpeed's `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` (ZeRO-1/2/3
and bf16; deepspeed/utils/tensor_fragment.py), and written as one safetensors file. Any number of ranks loads
it back with the `safe_set_*` counterparts, each rank keeping its own partition. One CPU rank runs without
ZeRO (speed.effective_zero_stage): there the parameter is its own master copy and the moments sit in the
torch optimizer's state.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

STATE_FILE = "adapter_state.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch.optim.AdamW's state keys


def trainable(module: Any) -> list[tuple[str, Any]]:
    """(name, parameter) of what is trained, in the same order on every rank (collectives follow it)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _base(engine: Any) -> Any:
    """The torch optimizer under DeepSpeed's wrapper (ZeRO keeps its state on flat fp32 partitions)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _plain(p: Any) -> bool:
    """No ZeRO and no mixed-precision wrapper: DeepSpeed's safe_* accessors return None for it."""
    return not hasattr(p, "ds_id") and not hasattr(p, "_hp_mapping")


def gather(engine: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor and its Adam moments, whole, fp32, on CPU (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = {}
    base = _base(engine)
    for name, p in trainable(engine.module):
        if _plain(p):
            st = base.state.get(p, {})
            got = {"param": p.detach(), **{k: st[k] for k in MOMENTS if k in st}}
        else:
            got = {"param": safe_get_full_fp32_param(p)}
            got.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
        for kind, t in got.items():
            if t is not None:
                out[f"{kind}/{name}"] = t.detach().float().cpu().clone().contiguous()
    return out


def scatter(engine: Any, tensors: Mapping[str, torch.Tensor], steps: int | None) -> None:
    """Load what `gather` saved (or, with steps=None, only the weights: a warm start) into this rank's
    partitions: the module's parameters, DeepSpeed's fp32 master copies and the optimizer's moments."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = _base(engine)
    for name, p in trainable(engine.module):
        value = tensors[f"param/{name}"]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # ZeRO-3: rank 0's copy is broadcast
            p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))
        if _plain(p):
            if steps is not None:
                base.state[p] = {
                    "step": torch.tensor(float(steps)),
                    **{k: tensors[f"{k}/{name}"].to(p.device).view_as(p).clone() for k in MOMENTS},
                }
            continue
        safe_set_full_fp32_param(p, value.to(engine.device))
        if steps is not None:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, tensors[f"{k}/{name}"].to(engine.device), k)
    if steps is not None:
        for st in base.state.values():
            if "step" in st:
                st["step"] = torch.full_like(torch.as_tensor(st["step"]), float(steps))


def continue_schedule(sched: Any, steps: int) -> None:
    """The LR schedule after `steps` updates: LambdaLR recomputes every group's LR from the step alone."""
    sched.last_epoch = steps - 1
    sched.step()


# --- RNG state as JSON (never a pickle: a checkpoint is data a tenant's store may hold) ---


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    st: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, [int(x) for x in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def set_rng_state(st: Mapping[str, Any]) -> None:
    version, mt, gauss = st["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


def rng_bytes() -> bytes:
    return json.dumps(rng_state()).encode()
