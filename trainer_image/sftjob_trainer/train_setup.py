"""Setting up a training run: process group, data, model and the DeepSpeed engine (train.py runs it; the
align stage, align_stage.py, runs the same setup with its own data, wrapper and checkpoint prefix)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from sftjob_api import Layout, Stage
from sftjob_api.ports import free_port
from sftjob_api.storage import Store, open_store
from sftjob_api.trainer_config import TrainerConfig

from . import checkpoint
from .config import DistEnv
from .curation.report import content_hash
from .loss import SelectiveLossLM
from .metrics import TrainerMetrics, log_json
from .model import load_for_training, weights_dtype, zero3_init
from .packing import Examples, Row, single_rows
from .pipeline import prepare_train
from .run_identity import fingerprint, run_id_from_env
from .schedule import BatchPlan, deepspeed_config, lr_factor, plan_batches
from .shards import train_order
from .speed import effective_zero_stage
from .tracking import Tracker

# deepspeed is imported inside the functions: it picks its accelerator at import, and setup() sets
# DS_ACCELERATOR=cpu first when there is no GPU.


# Test-only (docs/trainer.md): after this optimizer step, wait (at most 10 min) until SIGTERM arrives, so a
# test interrupts mid-training however fast the machine trains.
HOLD_ENV = "SFTJOB_TEST_HOLD_AFTER_STEP"
# Test-only (docs/trainer.md): every rank logs the example indices of each step, so a test counts them.
LOG_SAMPLES_ENV = "SFTJOB_TEST_LOG_SAMPLES"


class StopFlag:
    """Set by SIGTERM; checked (and agreed on by all ranks) after each optimizer step."""

    def __init__(self) -> None:
        self.requested = False
        self.hold_after = int(os.environ.get(HOLD_ENV) or 0)
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def hold(self, step: int, limit_s: float = 600) -> None:
        deadline = time.monotonic() + limit_s
        while step == self.hold_after and not self.requested and time.monotonic() < deadline:
            time.sleep(0.05)


def init_distributed(env: DistEnv, on_gpu: bool, collective_timeout_s: int) -> None:
    """Join the process group. Every collective waits at most `collective_timeout_s` (runPolicy.
    collectiveTimeoutSeconds) for its peers, then raises: the rank exits with the retryable code instead of
    waiting for DeepSpeed's default (10 min) when a peer vanished without closing its connections."""
    import deepspeed

    if "MASTER_ADDR" not in os.environ:  # plain `python -m sftjob_trainer train`: a world of one
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
            }
        )
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu else "gloo", timeout=timedelta(seconds=collective_timeout_s)
    )


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def numel(p: Any) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (then `p` itself is empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


def make_optimizer(model: Any, cfg: TrainerConfig) -> Any:
    t = cfg.training
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # a partitioned parameter is 1-d and empty
            (no_decay if ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    groups = [
        {"params": ps, "weight_decay": wd} for ps, wd in ((decay, t.weight_decay), (no_decay, 0.0)) if ps
    ]  # ZeRO drops empty groups
    if t.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # here: only runs that use it load it (__main__.unused_optional_packages)

        return bnb.optim.AdamW8bit(groups, lr=t.learning_rate)  # type: ignore[attr-defined]
    return torch.optim.AdamW(groups, lr=t.learning_rate)


@dataclass
class StageData:
    """What a stage's loop steps through: `rows` of indices into `examples` and the batch plan over them."""

    examples: Any  # Examples (train), or the align stage's preference pairs
    lengths: list[int]  # tokens of each example (the micro-batch layout groups similar lengths)
    rows: list[Row]
    plan: BatchPlan
    report: dict[str, Any]
    key: str  # the data's content identity (in the checkpoint fingerprint)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # more fields that decide the computation
    held_out: Any = None  # the align stage's eval pairs


@dataclass
class Setup:
    """Everything built once before the first step (`setup`); the loop's parts read it."""

    cfg: TrainerConfig
    env: DistEnv
    stop: StopFlag
    metrics: TrainerMetrics
    tracker: Tracker
    store: Store
    staging: str
    model: Any  # the peft/transformers model (exported at the end)
    tok: Any
    engine: Any
    sched: Any
    plan: BatchPlan
    rows: list[Row]
    lengths: list[int]
    examples: Examples
    report: dict[str, Any]
    ident: checkpoint.Identity
    stage: Stage = Stage.TRAIN
    held_out: Any = None

    @property
    def is0(self) -> bool:
        return self.env.rank == 0


Prepare = Callable[[TrainerConfig, Any, DistEnv, TrainerMetrics], StageData]  # (cfg, tokenizer, env, metrics)


def sft_wrapper(model: Any, cfg: TrainerConfig) -> Any:
    return SelectiveLossLM(model, neftune_alpha=cfg.training.neftune_alpha)


def setup(
    cfg: TrainerConfig,
    stage: Stage = Stage.TRAIN,
    prepare: Prepare | None = None,
    wrap: Callable[[Any, TrainerConfig], Any] = sft_wrapper,
) -> Setup:
    """Process group, data, model, DeepSpeed engine: everything the steps need. `prepare` reads the stage's
    data (default: the SFT data), `wrap` puts the module DeepSpeed trains around the model."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_id = run_id_from_env()
    env = DistEnv.from_env()
    if on_gpu:
        torch.cuda.set_device(env.local_rank)
    stop = StopFlag()
    init_distributed(env, on_gpu, cfg.run_policy.collective_timeout_seconds)
    env = DistEnv.from_env()
    import deepspeed

    t = cfg.training
    seed_all(t.seed)
    port = cfg.runtime.metrics_port + env.local_rank if cfg.runtime.metrics_port else None
    metrics = TrainerMetrics(cfg.run.namespace, cfg.run.name, env.rank, port, align=stage == Stage.ALIGN)
    store = open_store(cfg.run.output_root, cfg.output)
    staging = os.path.join(cfg.runtime.work_dir, "staging")
    is0 = env.rank == 0
    tracker = Tracker(cfg, store, stage, enabled=is0)  # rank 0 logs; never fails the run

    ds = cfg.resources.deepspeed
    zero_stage = effective_zero_stage(ds.zero_stage, env.world_size, ds.offload_params, ds.offload_optimizer)
    # DeepSpeed's precision must match the weights' dtype (bf16 on GPU, fp32 on CPU)
    bf16 = weights_dtype(cfg.method, on_gpu) == torch.bfloat16

    def ds_config(micro: int, accum: int) -> dict[str, Any]:
        return deepspeed_config(
            micro=micro,
            accum=accum,
            world=env.world_size,
            stage=zero_stage,
            offload_optimizer=ds.offload_optimizer,
            offload_params=ds.offload_params,
            bf16=bf16,
            fp16=False,
            grad_clip=t.max_grad_norm,
        )

    # zero.Init reads only the ZeRO and precision sections; the batch geometry needs the data (below).
    # Kept alive (a local of this function) through deepspeed.initialize: transformers and peft hold a weakref.
    zero_init = zero3_init(ds_config(t.micro_batch_size, 1), cfg.method)
    model, tok = load_for_training(cfg, on_gpu)
    if is0:
        log_model(model, cfg, zero_init is not None)
    data = (prepare or prepare_sft)(cfg, tok, env, metrics)
    if is0:
        store.put_bytes(json.dumps(data.report, indent=1).encode(), DATA_REPORT[stage])

    wrapper = wrap(model, cfg)
    # from_pretrained returns eval mode: without this, no LoRA dropout, no NEFTune, no grad checkpointing
    wrapper.train()
    optimizer = make_optimizer(wrapper, cfg)
    plan = data.plan
    warmup = math.ceil(t.warmup_ratio * plan.total_steps)

    def make_sched(opt: Any) -> Any:  # built on DeepSpeed's wrapped optimizer
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, plan.total_steps, warmup, t.scheduler)
        )

    if is0:
        log_json(
            "deepspeed", zero_stage=zero_stage, configured_zero_stage=ds.zero_stage, world_size=env.world_size
        )
    engine, _, _, sched = deepspeed.initialize(
        model=wrapper, optimizer=optimizer, lr_scheduler=make_sched, config=ds_config(plan.micro, plan.accum)
    )
    portable_ok = cfg.method.type != "full"  # lora/qlora, adamw or adamw_8bit (bnb_state.py)
    ident = checkpoint.Identity(
        run_id,
        {**fingerprint(cfg, data.key), **data.fingerprint},
        checkpoint.ADAPTER if portable_ok else checkpoint.DEEPSPEED,
        Layout.STAGE_CHECKPOINTS[stage],
    )
    return Setup(
        cfg,
        env,
        stop,
        metrics,
        tracker,
        store,
        staging,
        model,
        tok,
        engine,
        sched,
        plan,
        data.rows,
        data.lengths,
        data.examples,
        data.report,
        ident,
        stage,
        data.held_out,
    )


DATA_REPORT = {Stage.TRAIN: Layout.DATA_REPORT, Stage.ALIGN: Layout.ALIGN_DATA_REPORT}


def prepare_sft(cfg: TrainerConfig, tok: Any, env: DistEnv, metrics: TrainerMetrics) -> StageData:
    """The SFT data: curated (or reused), this rank's shard, packed into rows and planned."""
    data = prepare_train(cfg, tok, env.rank, env.world_size)
    log_json("data_fetched", rank=env.rank, keys=data.fetched, examples=len(data.examples))  # every rank
    metrics.record_data(data.report, data.reused)
    order = train_order(data.lengths, cfg, env.world_size)
    if env.rank == 0:
        log_json(
            "data",
            report=data.report,
            curated_key=data.key,
            curated_reused=data.reused,
            train_examples=len(data.lengths),
            eval_examples=data.report.get("eval_examples"),
            rows=len(order.rows),
            packing=cfg.dataset.packing,
            plan=order.plan.__dict__,
        )
    key = data.key or examples_digest(data.examples)
    return StageData(data.examples, data.lengths, order.rows, order.plan, data.report, key)


def plan_single_rows(cfg: TrainerConfig, n: int, world: int) -> tuple[list[Row], BatchPlan]:
    """One example per row (the align stage's pairs), planned with cfg.training's batch settings."""
    t = cfg.training
    return single_rows(n), plan_batches(
        n, t.global_batch_size, t.micro_batch_size, world, t.epochs, t.max_steps
    )


def examples_digest(examples: Examples) -> str:
    """The data's identity when it has no curated-cache key: curation's content hash of its examples."""
    ordered = [examples[i] for i in sorted(examples)] if isinstance(examples, Mapping) else examples
    return content_hash(ordered, ())


def log_model(model: Any, cfg: TrainerConfig, zero_init: bool) -> None:
    n_4bit = sum(
        1
        for m in model.modules()  # bitsandbytes' own class, not peft's wrapper of it
        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
    )
    log_json(
        "model",
        method=cfg.method.type,
        linear_4bit_layers=n_4bit,
        trainable_params=sum(numel(p) for p in model.parameters() if p.requires_grad),
        params=sum(numel(p) for p in model.parameters()),
        params_held=sum(p.numel() for p in model.parameters()),  # this rank's memory before DeepSpeed
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        zero3_init=zero_init,
        attention=getattr(model.config, "_attn_implementation", None),  # model.training_attention
    )
