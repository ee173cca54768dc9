"""World-size-independent training state of an adapter run, and RNG state, without pickles.

The trainable parameters (LoRA matrices, modulesToSave) are small: each is gathered whole, in fp32, with its
Adam moments, through DeepSpeed's `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` (ZeRO-1/2/3
and bf16; deepspeed/utils/tensor_fragment.py), and written as one safetensors file. Any number of ranks loads
it back with the `safe_set_*` counterparts, each rank keeping its own partition. One CPU rank runs without
ZeRO (speed.effective_zero_stage): there the parameter is its own master copy and the moments sit in the
torch optimizer's state. bitsandbytes' 8-bit AdamW's moments travel the same way, as fp32 (bnb_state.py).
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import bnb_state

STATE_FILE = "adapter_state.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch.optim.AdamW's state keys


def trainable(module: Any) -> list[tuple[str, Any]]:
    """(name, parameter) of what is trained, in the same order on every rank (collectives follow it)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def base(engine: Any) -> Any:
    """The torch optimizer under DeepSpeed's wrapper (ZeRO keeps its state on flat fp32 partitions)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _plain(p: Any) -> bool:
    """No ZeRO and no mixed-precision wrapper: DeepSpeed's safe_* accessors return None for it."""
    return not hasattr(p, "ds_id") and not hasattr(p, "_hp_mapping")


def gather(engine: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor and its Adam moments, whole, fp32, on CPU (collective under ZeRO-3)."""
    out: dict[str, torch.Tensor] = {}
    opt = base(engine)
    eight_bit = bnb_state.float_moments(opt) if bnb_state.is_bnb(opt) else contextlib.nullcontext()
    with eight_bit:
        for name, p in trainable(engine.module):
            out.update(_gathered(opt, name, p))
    return out


def _gathered(opt: Any, name: str, p: Any) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _plain(p):
        st = opt.state.get(p, {})
        got = {"param": p.detach(), **{k: st[k] for k in MOMENTS if k in st}}
    else:
        got = {"param": safe_get_full_fp32_param(p)}
        got.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
    return {
        f"{kind}/{name}": t.detach().float().cpu().clone().contiguous()
        for kind, t in got.items()
        if t is not None
    }


def _init_adam_state(engine: Any) -> None:
    """Adam's state as its first step would create it, so the saved moments have somewhere to go: DeepSpeed
    creates none before the first step. ZeRO-3 lists its flat fp32 partitions in the optimizer's param
    groups only around its own step, so they are taken from it directly."""
    opt = base(engine)
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    for fp in flat if flat is not None else [p for g in opt.param_groups for p in g["params"]]:
        st = opt.state[fp]
        if not st:
            st["step"] = torch.tensor(0.0)
            st.update({k: torch.zeros_like(fp, memory_format=torch.preserve_format) for k in MOMENTS})


def _z3_set(p: Any, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of a full fp32 tensor into ZeRO-3's partition of `p` (its master copy, or optimizer
    state `key`). DeepSpeed's own `set_full_hp_param` (0.19) slices the unpadded tensor, so it fails on the
    last rank whenever a parameter's size does not divide by the world size (512 over 3 ranks: partitions
    of 171); the padding is zeros, as ZeRO's own."""
    opt = p._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n, rank = part.numel(), opt._get_param_partition_rank(p)
    flat = value.flatten().to(part.device, part.dtype)
    if flat.numel() < n * (rank + 1):
        flat = torch.cat([flat, flat.new_zeros(n * (rank + 1) - flat.numel())])
    part.data.copy_(flat.narrow(0, n * rank, n))
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)


def scatter(
    engine: Any,
    tensors: Mapping[str, torch.Tensor],
    steps: int | None,
    raw_8bit: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load what `gather` saved (or, with steps=None, only the weights: a warm start) into this rank's
    partitions: the module's parameters, DeepSpeed's fp32 master copies and the optimizer's moments
    (`raw_8bit`: an 8-bit optimizer's own state of this rank, saved at this world size: bnb_state.py)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = base(engine)
    if steps is not None:
        _init_adam_state(engine)
    moments = MOMENTS if steps is not None else ()
    for name, p in trainable(engine.module):
        value = tensors[f"param/{name}"]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # ZeRO-3: rank 0's copy is broadcast
            p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))
        if hasattr(p, "ds_id"):  # ZeRO-3
            _z3_set(p, value, None)
            for k in moments:
                _z3_set(p, tensors[f"{k}/{name}"], k)
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16
            safe_set_full_fp32_param(p, value.to(engine.device))
            for k in moments:
                safe_set_full_optimizer_state(p, tensors[f"{k}/{name}"].to(engine.device), k)
        else:  # no ZeRO, fp32: the parameter is its own master copy
            for k in moments:
                opt.state[p][k].copy_(tensors[f"{k}/{name}"].view_as(p))
    if steps is None:
        return
    if bnb_state.is_bnb(opt):
        bnb_state.quantize_into(engine, opt, steps, raw_8bit)
        return
    for st in opt.state.values():
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
