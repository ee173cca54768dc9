"""The training loop: DeepSpeed (ZeRO-3 by default) under torchrun, readable top to bottom.

One optimizer step = `accum` micro-batches on each of `world` ranks. The loss is the sum of token losses
over the *whole global batch* divided by its label count (counted across ranks before the step), so
packing, padding and rank count do not change what is optimized.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from datetime import timedelta
from typing import Any

import bitsandbytes as bnb
import numpy as np
import torch
import torch.distributed as dist

from sftjob_api import Layout, Stage
from sftjob_api.exit_codes import ExitCode, Preempted
from sftjob_api.manifest import close_run
from sftjob_api.ports import free_port
from sftjob_api.storage import open_store
from sftjob_api.trainer_config import TrainerConfig

from . import checkpoint
from .config import DistEnv
from .loss import SelectiveLossLM, base_causal_lm
from .metrics import TrainerMetrics, log_json
from .model import load_for_training, weights_dtype, zero3_init
from .packing import collate, epoch_order, micro_batches_for
from .pipeline import prepare_train
from .schedule import deepspeed_config, lr_factor
from .shards import train_order
from .speed import effective_zero_stage
from .tracking import Tracker, termination_message

# deepspeed is imported inside the functions: it picks its accelerator at import, and train() sets
# DS_ACCELERATOR=cpu first when there is no GPU.


# Test-only (docs/trainer.md): after this optimizer step, wait (at most 10 min) until SIGTERM arrives, so a
# test interrupts mid-training however fast the machine trains.
HOLD_ENV = "SFTJOB_TEST_HOLD_AFTER_STEP"


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
        return bnb.optim.AdamW8bit(groups, lr=t.learning_rate)  # type: ignore[attr-defined]
    return torch.optim.AdamW(groups, lr=t.learning_rate)


def _allreduce(values: list[float]) -> list[float]:
    # NCCL reduces CUDA tensors only
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return [float(x) for x in t]


def export_weights(engine: Any, model: Any, tok: Any, cfg: TrainerConfig, rank: int, out_dir: str) -> str:
    """Rank 0 writes the adapter (lora/qlora) or the full model in transformers format into out_dir."""
    import deepspeed

    full = cfg.method.type == "full"
    names = [n for n, p in model.named_parameters() if full or p.requires_grad]
    params = [p for n, p in model.named_parameters() if full or p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            sd = {n: p.detach().cpu().clone() for n, p in zip(names, params, strict=True)}
            if full:
                base_causal_lm(model).save_pretrained(out_dir, state_dict=sd)
            else:  # the spec's model reference, not this pod's copy of the model (docs/serving.md)
                model.peft_config["default"].base_model_name_or_path = cfg.base_model_reference()
                model.save_pretrained(out_dir, state_dict=sd)
            tok.save_pretrained(out_dir)
    dist.barrier()
    return Layout.weights(cfg.method.type)


def train(cfg: TrainerConfig) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
    metrics = TrainerMetrics(cfg.run.namespace, cfg.run.name, env.rank, port)
    store = open_store(cfg.run.output_root, cfg.output)
    staging = os.path.join(cfg.runtime.work_dir, "staging")
    is0 = env.rank == 0
    tracker = Tracker(cfg, store, Stage.TRAIN, enabled=is0)  # rank 0 logs; never fails the run

    ds = cfg.resources.deepspeed
    stage = effective_zero_stage(ds.zero_stage, env.world_size, ds.offload_params, ds.offload_optimizer)
    # DeepSpeed's precision must match the weights' dtype (bf16 on GPU, fp32 on CPU)
    bf16 = weights_dtype(cfg.method, on_gpu) == torch.bfloat16

    def ds_config(micro: int, accum: int) -> dict[str, Any]:
        return deepspeed_config(
            micro=micro,
            accum=accum,
            world=env.world_size,
            stage=stage,
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
    data = prepare_train(cfg, tok, env.rank, env.world_size)
    examples, lengths, report = data.examples, data.lengths, data.report
    log_json("data_fetched", rank=env.rank, keys=data.fetched, examples=len(examples))  # every rank: its own
    if is0:
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
            gradient_checkpointing=t.gradient_checkpointing,
            zero3_init=zero_init is not None,
        )
    metrics.record_data(report, data.reused)
    order = train_order(lengths, cfg, env.world_size)
    rows, plan = order.rows, order.plan
    if is0:
        log_json(
            "data",
            report=report,
            curated_key=data.key,
            curated_reused=data.reused,
            train_examples=len(lengths),
            eval_examples=report.get("eval_examples"),
            rows=len(rows),
            packing=cfg.dataset.packing,
            plan=plan.__dict__,
        )
        store.put_bytes(json.dumps(report, indent=1).encode(), Layout.DATA_REPORT)

    wrapper = SelectiveLossLM(model, neftune_alpha=t.neftune_alpha)
    # from_pretrained returns eval mode: without this, no LoRA dropout, no NEFTune, no grad checkpointing
    wrapper.train()
    optimizer = make_optimizer(wrapper, cfg)
    warmup = math.ceil(t.warmup_ratio * plan.total_steps)

    def make_sched(opt: Any) -> Any:  # built on DeepSpeed's wrapped optimizer, saved in its checkpoints
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, plan.total_steps, warmup, t.scheduler)
        )

    if is0:
        log_json(
            "deepspeed", zero_stage=stage, configured_zero_stage=ds.zero_stage, world_size=env.world_size
        )
    engine, _, _, sched = deepspeed.initialize(
        model=wrapper, optimizer=optimizer, lr_scheduler=make_sched, config=ds_config(plan.micro, plan.accum)
    )

    start, tokens_seen = 0, 0
    full = cfg.method.type == "full"  # adapters: the frozen base comes from the model source, not checkpoints
    resume = Layout.newest_checkpoint(store.list(Layout.CHECKPOINTS))
    if resume is not None:
        state, fetched = checkpoint.load(engine, store, resume, env.rank, staging, frozen_saved=full)
        log_json("checkpoint_fetched", rank=env.rank, step=resume, files=fetched)  # every rank: its own list
        start, tokens_seen = int(state["step"]), int(state.get("tokens", 0))
        metrics.resumed_step.set(start)
        if is0:
            log_json("resumed", step=start)
    metrics.total_steps.set(plan.total_steps)
    metrics.step.set(start)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    order_epoch, ordered = -1, rows
    t_run = time.monotonic()
    loss = float("nan")

    for step in range(start, plan.total_steps):
        t0 = time.monotonic()
        epoch, within = divmod(step, plan.steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, ordered = epoch, epoch_order(rows, t.seed, epoch)
        mbs = micro_batches_for(env.rank, env.world_size, within, ordered, lengths, plan.micro, plan.accum)
        batches = [collate(mb, examples, pad_id) for mb in mbs]
        local_labels = sum(int((b["targets"] != -100).sum()) for b in batches)
        local_real = sum(b["real_tokens"] for b in batches)
        n_labels, _ = _allreduce([local_labels, 0.0])
        scale = plan.accum * env.world_size / max(n_labels, 1.0)
        lr = sched.get_last_lr()[0]
        loss_sum = 0.0
        for b in batches:
            out, _ = engine(*(b[name].to(engine.device) for name in ("input_ids", "position_ids", "targets")))
            engine.backward(out * scale)
            engine.step()
            loss_sum += float(out.detach())
        tot_loss, tot_real, stop_votes = _allreduce([loss_sum, float(local_real), float(stop.requested)])
        loss = tot_loss / max(n_labels, 1.0)
        tokens_seen += int(tot_real)  # all ranks
        done = step + 1
        dt = time.monotonic() - t0
        gn = engine.get_global_grad_norm()
        tps = tot_real / dt if dt > 0 else 0.0
        eta = (time.monotonic() - t_run) / (done - start) * (plan.total_steps - done)
        metrics.loss.set(loss)
        metrics.lr.set(lr)
        metrics.step.set(done)
        metrics.epoch.set(done / plan.steps_per_epoch)
        metrics.tokens.inc(local_real)
        metrics.tps.set(tps)
        metrics.eta.set(eta)
        if gn is not None:
            metrics.grad_norm.set(float(gn))
        metrics.sample_memory()
        if is0 and (done % cfg.runtime.log_every_steps == 0 or done == plan.total_steps):
            log_json(
                "step",
                step=done,
                total_steps=plan.total_steps,
                loss=round(loss, 6),
                lr=lr,
                grad_norm=None if gn is None else float(gn),
                epoch=round(done / plan.steps_per_epoch, 4),
                tokens_per_second=round(tps, 1),
                tokens=int(tot_real),
                step_seconds=round(dt, 3),
                eta_seconds=round(eta, 1),
            )
            tracker.metrics(
                {
                    "train_loss": loss,
                    "learning_rate": lr,
                    "tokens_per_second": tps,
                    "grad_norm": None if gn is None else float(gn),
                    "epoch": done / plan.steps_per_epoch,
                },
                done,
            )
        preempt = stop_votes > 0
        if (done % t.checkpoint_steps == 0 or preempt) and done < plan.total_steps:
            c0 = time.monotonic()
            checkpoint.save(
                engine,
                store,
                done,
                env.rank,
                staging,
                {"step": done, "tokens": tokens_seen, "loss": loss},
                cfg.output.keep_checkpoints,
                save_frozen=full,
            )
            metrics.ckpt_seconds.observe(time.monotonic() - c0)
            metrics.checkpoint_step.set(done)
            if is0:
                log_json("checkpoint", step=done, seconds=round(time.monotonic() - c0, 3))
        if preempt:
            tracker.close(timeout=30)
            raise Preempted(f"SIGTERM: checkpoint step-{done} saved, exiting for a retry")
        stop.hold(done)

    out_dir = os.path.join(staging, "final")
    kind = export_weights(engine, model, tok, cfg, env.rank, out_dir)
    if is0:
        store.upload_dir(out_dir, kind)
        summary = {
            "steps": plan.total_steps,
            "final_loss": loss,
            "tokens": tokens_seen,
            "resumed_from": resume,
            "plan": plan.__dict__,
            "data": report,
        }
        store.put_bytes(json.dumps(summary, indent=1).encode(), Layout.TRAIN_SUMMARY)
        tracker.metrics({"train_final_loss": loss, "train_tokens": tokens_seen}, plan.total_steps)
        tracker.artifact(Layout.DATA_REPORT)
        if cfg.is_final(Stage.TRAIN):  # a train-only run: nothing runs after this stage
            tracker.flush()  # the run's id is in the store before the manifest lists it
            close_run(store, cfg, Stage.TRAIN)
            tracker.artifact(Layout.MANIFEST)
        termination_message(cfg, tracker.close(final=cfg.is_final(Stage.TRAIN)))
        log_json("done", kind=kind, steps=plan.total_steps, final_loss=loss)
    dist.barrier()
    return int(ExitCode.OK)
