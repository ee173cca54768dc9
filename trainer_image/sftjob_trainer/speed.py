"""CPU/GPU speed levers that keep the maths unchanged (measured in docs/performance.md).

- `effective_zero_stage`: ZeRO partitions parameters, gradients and optimizer state *across ranks*; with one
  rank and no offload there is nothing to split, but stage 3 still gathers and frees every parameter around
  every module call (three times per micro-batch with gradient checkpointing). Stage 0 there.
- `FastDropout`: peft's LoRA dropout draws a float Bernoulli mask per element, which on CPU costs tens of times
  the LoRA matmul it feeds (20% of a SmolLM2 step). The same Bernoulli(p) mask from 15-bit random integers is
  several times cheaper; p is rounded to a multiple of 1/32768 and the kept values are scaled by
  1/(1 - that p), so the expectation is exact. Each 32-bit draw of the CPU generator feeds two elements (its
  two 16-bit halves, sign bit cleared), half the draws of one per element (measured: 20 -> 14 ms for a
  8 x 1024 x 576 activation).
- `checkpointing_kwargs("selective")`: gradient checkpointing that keeps the outputs of the base model's
  matmuls and of attention (the expensive ops) and recomputes the cheap ones (norms, SiLU, RoPE, dropout,
  residual adds, LoRA's rank-r up-projections). Most activation memory is still freed, at a fraction of full
  recomputation's cost.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

_INT16_RANGE = 1 << 15  # draws are uniform 15-bit integers: [0, 2**15)


def effective_zero_stage(stage: int, world_size: int, offload_params: str, offload_optimizer: str) -> int:
    """The ZeRO stage to run: 0 when a single rank would only pay partitioning overhead."""
    if world_size == 1 and offload_params == "none" and offload_optimizer == "none":
        return 0
    return stage


def dropout_threshold(p: float) -> int:
    """Draws below this (out of 2**15) are dropped."""
    return round(p * _INT16_RANGE)


def draws15(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, 2**15) of `shape` (int16), two per 32-bit draw: random_() on int32 draws from
    [0, 2**31), whose low half is uniform on all 16 bits and high half on the low 15; clearing the sign bit
    makes both uniform on [0, 2**15)."""
    n = shape.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()
    return words.view(torch.int16)[:n].view(shape).bitwise_and_(_INT16_RANGE - 1)


class FastDropout(nn.Module):
    """Inverted dropout with a mask from 15-bit random integers (CPU generator, checkpoint-replayable)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = dropout_threshold(p)
        self.scale = 1.0 / (1.0 - self.threshold / _INT16_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return torch.where(draws15(x.shape, x.device) >= self.threshold, x * self.scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_lora_dropout(model: nn.Module) -> int:
    """Swap peft's per-module `lora_dropout` nn.Dropout layers for FastDropout; returns how many."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key, d in list(drops.items()):
                if isinstance(d, nn.Dropout) and d.p > 0:
                    drops[key] = FastDropout(d.p)
                    n += 1
    return n


# outputs kept: recomputing these is what makes full checkpointing ~1.5x slower
_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
_MATMUL_ARGS = {torch.ops.aten.mm.default: 0, torch.ops.aten.bmm.default: 0, torch.ops.aten.addmm.default: 1}


def must_save(op: Any, args: tuple[Any, ...]) -> bool:
    """Attention, and matmuls except low-rank expansions: LoRA's up-projection (inner dim r, output d_out)
    costs only 2r flops per output value to redo, while keeping its output costs as much memory as
    keeping the base projection's."""
    if op in _ATTENTION:
        return True
    first = _MATMUL_ARGS.get(op)
    if first is None:
        return False
    inner, width = int(args[first].shape[-1]), int(args[first + 1].shape[-1])
    return 4 * inner >= width


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if must_save(op, args) else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_kwargs(policy: str) -> dict[str, Any]:
    """`gradient_checkpointing_kwargs` for transformers: `full` recomputes everything, `selective` keeps
    matmul/attention outputs."""
    kw: dict[str, Any] = {"use_reentrant": False}
    if policy == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kw["context_fn"] = partial(create_selective_checkpoint_contexts, _policy)
    return kw
