"""bitsandbytes' 8-bit AdamW (`optimizer: adamw_8bit`) in the adapter format (portable.py).

bitsandbytes keeps, per tensor it steps (one rank's flat fp32 partition under ZeRO, the parameter itself
without), Adam's two moments as `state1`/`state2`: fp32 for tensors under `min_8bit_size` (4096 elements),
else uint8 codes of a dynamic map (`qmap1` signed, `qmap2` unsigned) scaled per block of 256 elements by
`absmax1`/`absmax2`. Its update dequantizes them, does torch AdamW's arithmetic (same bias correction, same
decoupled weight decay) and quantizes again, so the dequantized moments are exactly what its next step uses.

Save: the moments are dequantized with bitsandbytes' own `dequantize_blockwise` into torch AdamW's fp32
`exp_avg`/`exp_avg_sq` for the duration of portable.gather, which then gathers them like AdamW's
(world-size independent, exact). Each rank also keeps its raw state (`rank_file`): a few bytes per element.
Load: bitsandbytes' own `init_state` lays the state out at this world size (8-bit or fp32, the blocks over
this rank's partition), then
  - the same world size (the same partitions, the same blocks): the raw state is copied back — bit-exact;
  - another size: `quantize_blockwise` quantizes the fp32 moments into the new blocks: each value is rounded
    to the nearest code of a block that groups other elements, the error of one more 8-bit quantization
    (requantizing even at the same layout is not exact: the signed map's most negative code is -0.993, so a
    block whose largest moment is negative gets a smaller absmax). The fp32 master weights stay exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

BLOCK = 256  # bitsandbytes' blockwise optimizer state (Optimizer2State.init_state)
MOMENT_OF = {1: "exp_avg", 2: "exp_avg_sq"}  # state1 is m, state2 is v (Adam)


def rank_file(rank: int) -> str:
    return f"bnb_state_rank{rank}.safetensors"


def is_bnb(opt: Any) -> bool:
    return type(opt).__module__.startswith("bitsandbytes")


@contextlib.contextmanager
def slots(engine: Any, base: Any) -> Iterator[list[tuple[dict[str, Any], int, int, torch.Tensor]]]:
    """(group, group index, index in group, tensor) of every tensor the optimizer steps, in a fixed order.
    ZeRO-3 lists its flat fp32 partitions in the optimizer's param groups only around its own step (one at a
    time, at index 0): they are put there for the duration, as DeepSpeed does."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is None:
        yield [(g, gi, pi, p) for gi, g in enumerate(base.param_groups) for pi, p in enumerate(g["params"])]
        return
    group_of = engine.optimizer.sub_group_to_group_id
    saved = [g["params"] for g in base.param_groups]
    try:
        out = []
        for sub, t in enumerate(flat):
            gi = group_of[sub]
            base.param_groups[gi]["params"] = [t]
            out.append((base.param_groups[gi], gi, 0, t))
        yield out
    finally:
        for g, ps in zip(base.param_groups, saved, strict=True):
            g["params"] = ps


def _dequantized(st: Mapping[str, Any], i: int) -> torch.Tensor:
    import bitsandbytes.functional as F

    s: torch.Tensor = st[f"state{i}"]
    if s.dtype != torch.uint8:
        return s.detach().float().clone()
    out: torch.Tensor = F.dequantize_blockwise(
        s, absmax=st[f"absmax{i}"], code=st[f"qmap{i}"], blocksize=BLOCK
    )
    return out


@contextlib.contextmanager
def float_moments(base: Any) -> Iterator[None]:
    """torch AdamW's `exp_avg`/`exp_avg_sq` (fp32, dequantized) next to each state, for the duration."""
    added = []
    try:
        for st in base.state.values():
            if "state1" in st:
                st.update({MOMENT_OF[i]: _dequantized(st, i) for i in (1, 2)})
                added.append(st)
        yield
    finally:
        for st in added:
            for k in MOMENT_OF.values():
                st.pop(k, None)


def raw_state(engine: Any, base: Any) -> dict[str, torch.Tensor]:
    """This rank's quantized state as it is (codes, absmax; fp32 for small tensors), by slot."""
    out = {}
    with slots(engine, base) as ss:
        for n, (_, _, _, t) in enumerate(ss):
            for k, v in _quantized(base.state[t]):
                out[f"{n}/{k}"] = v.detach().cpu().clone().contiguous()
    return out


def quantize_into(engine: Any, base: Any, steps: int, raw: Mapping[str, torch.Tensor] | None) -> None:
    """Turn the fp32 `exp_avg`/`exp_avg_sq` that portable.scatter loaded into bitsandbytes' own state at
    this world size (module docstring). `raw`: this rank's saved state, from the same world size; used only
    if it fits the new layout tensor for tensor (e.g. not after a change of zeroStage), else requantized."""
    import bitsandbytes.functional as F

    with slots(engine, base) as ss:
        states, moments = [], []
        for group, gi, pi, t in ss:
            st = base.state[t]
            moments.append({i: st.pop(MOMENT_OF[i]) for i in (1, 2)})
            st.clear()
            base.init_state(group, t, gi, pi)  # bitsandbytes' layout: 8-bit blocks or fp32 by size
            st["step"] = steps
            states.append(st)
        if raw is not None and not all(
            _fits(raw.get(f"{n}/{k}"), v) for n, st in enumerate(states) for k, v in _quantized(st)
        ):
            raw = None
        for n, (st, ms) in enumerate(zip(states, moments, strict=True)):
            if raw is not None:
                for k, v in _quantized(st):
                    v.copy_(raw[f"{n}/{k}"].to(v.device))
                continue
            for i, m in ms.items():
                s = st[f"state{i}"]
                if s.dtype == torch.uint8:
                    q, qs = F.quantize_blockwise(m.to(s.device), code=st[f"qmap{i}"], blocksize=BLOCK)
                    s.copy_(q)
                    st[f"absmax{i}"].copy_(qs.absmax)
                else:
                    s.copy_(m.view_as(s))


def _quantized(st: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The state tensors that hold the moments (codes and absmax, or fp32), as `raw_state` saves them."""
    return [(k, v) for k, v in st.items() if torch.is_tensor(v) and not k.startswith("qmap")]


def _fits(t: torch.Tensor | None, like: torch.Tensor) -> bool:
    return t is not None and t.shape == like.shape and t.dtype == like.dtype
