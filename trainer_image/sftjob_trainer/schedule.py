"""Pure planning: batch geometry, step counts, learning-rate schedule, DeepSpeed config (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sftjob_api.exit_codes import PermanentError


@dataclass(frozen=True)
class BatchPlan:
    micro: int  # rows per rank per micro-step
    accum: int  # gradient accumulation steps
    world: int
    steps_per_epoch: int
    total_steps: int

    @property
    def rows_per_step(self) -> int:
        return self.micro * self.accum * self.world


def plan_batches(
    n_rows: int, global_batch: int, micro: int, world: int, epochs: float | None, max_steps: int | None
) -> BatchPlan:
    """Gradient accumulation = global / (micro x world); must divide exactly (no silent change of LR scale)."""
    if global_batch % (micro * world):
        raise PermanentError(
            f"spec.training.globalBatchSize {global_batch} is not a multiple of microBatchSize {micro} x world"
            f" size {world}: the global batch is kept across restarts and resizes (a checkpoint resumes at any"
            f" world size W where it divides by microBatchSize x W; docs/api.md)"
        )
    accum = global_batch // (micro * world)
    steps_per_epoch = n_rows // global_batch
    if steps_per_epoch == 0:
        smallest = micro * world
        raise PermanentError(
            f"only {n_rows} training rows after filtering (and packing, when dataset.packing is on: each row"
            f" then holds several samples): fewer than one global batch of {global_batch}. To train, add data,"
            f" lower training.globalBatchSize to at most {n_rows} (a multiple of microBatchSize x world size ="
            f" {smallest}), or set dataset.packing: false (one sample per row)"
            + (
                ""
                if n_rows >= smallest
                else f"; with {smallest} rows per step at the least, lower"
                " training.microBatchSize or the number of GPUs too"
            )
        )
    if max_steps is not None:
        total = max_steps
    else:
        total = max(1, math.ceil(steps_per_epoch * (epochs if epochs is not None else 1.0)))
    return BatchPlan(micro, accum, world, steps_per_epoch, total)


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR for the update made at `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(min_ratio, 1.0 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(
    *,
    micro: int,
    accum: int,
    world: int,
    stage: int,
    offload_optimizer: str,
    offload_params: str,
    bf16: bool,
    fp16: bool,
    grad_clip: float,
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "overlap_comm": False,
                "contiguous_gradients": True,
            }
        )
    if offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params == "cpu" and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16},
        # we pass torch's AdamW / bitsandbytes' AdamW8bit ourselves (no JIT-built fused ops needed)
        "zero_allow_untested_optimizer": True,
        # with offload, DeepSpeed insists on its JIT-built CPUAdam unless told otherwise
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
