"""The training loop: DeepSpeed (ZeRO-3 by default) under torchrun, readable top to bottom.

One optimizer step = `accum` micro-batches on each of `world` ranks. The loss is the sum of token losses
over the *whole global batch* divided by its label count (counted across ranks before the step), so
packing, padding and rank count do not change what is optimized.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sftjob_api import Layout, Stage
from sftjob_api.exit_codes import ExitCode, Preempted
from sftjob_api.manifest import close_run
from sftjob_api.storage import open_store
from sftjob_api.trainer_config import TrainerConfig

from . import checkpoint, portable
from .checkpoint import TrainState
from .loss import base_causal_lm
from .metrics import log_json
from .packing import Batch, Row, collate, epoch_order, micro_batches_for, step_counts
from .tracking import termination_message
from .train_setup import (  # noqa: F401 (init_distributed, make_optimizer, numel, seed_all: benchmarks)
    HOLD_ENV,
    LOG_SAMPLES_ENV,
    Setup,
    init_distributed,
    make_optimizer,
    numel,
    seed_all,
    setup,
)

# deepspeed is imported inside the functions: it picks its accelerator at import, and train() sets
# DS_ACCELERATOR=cpu first when there is no GPU.


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, copied from pinned memory without making the host wait for the GPU (a CPU: `t`)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def on_device(values: list[float], device: torch.device) -> torch.Tensor:
    """A float64 vector of host numbers on `device` (to_device)."""
    return to_device(torch.tensor(values, dtype=torch.float64), device)


def device_batches(mbs: list[list[Row]], examples: Any, pad_id: int, device: torch.device) -> Iterator[Batch]:
    """The micro-batches on `device`, each collated when the loop asks for it. Nothing in the step waits
    for the GPU, so the host collates micro-batch k+1 (and queues its copy from pinned memory) while the
    kernels of k still run; on a CPU the same order costs nothing extra (`.to(cpu)` is no copy)."""
    for mb in mbs:
        b = collate(mb, examples, pad_id)
        yield {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


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


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int  # real tokens of the step, all ranks
    local_tokens: int
    seconds: float
    stop: bool  # a SIGTERM reached some rank: all ranks agree to checkpoint now and exit
    stats: dict[str, float] = field(default_factory=dict)  # the align stage's (dpo.STATS), all ranks' means


def resume(s: Setup) -> TrainState:
    """Where this run starts: its own newest checkpoint (run and fingerprint checked, files verified), else
    spec.training.resumeFrom's weights (a warm start at step 0), else step 0 (docs/recovery.md)."""
    prefix = s.ident.prefix
    keys = s.store.list(prefix)
    others = [r for r in Layout.checkpoint_runs(keys, prefix) if r != s.ident.run_id]
    if others and s.is0:  # an earlier SFTJob of the same name: kept, never loaded
        log_json("checkpoints_of_other_runs_ignored", runs=others, run=s.ident.run_id)
    step = Layout.newest_checkpoint(keys, s.ident.run_id, prefix)
    state = TrainState()
    if step is not None:
        state, fetched = checkpoint.load(s.engine, s.store, s.ident, step, s.env.rank, s.staging)
        log_json("checkpoint_fetched", rank=s.env.rank, step=step, files=fetched)  # every rank: its own list
        portable.continue_schedule(s.sched, state.step)
        s.metrics.resumed_step.set(state.step)
        if s.is0:
            log_json("resumed", step=state.step, samples=state.samples, world_size=s.env.world_size)
    elif s.cfg.training.resume_from:
        uri = s.cfg.training.resume_from
        parent, _, leaf = uri.rstrip("/").rpartition("/")
        src = open_store(parent + "/", s.cfg.output)
        n = checkpoint.warm_start(s.engine, checkpoint.warm_start_tensors(src, leaf, uri, s.staging))
        if s.is0:
            log_json("warm_start", resume_from=uri, tensors=n)
    return state


def train_step(s: Setup, state: TrainState, ordered: list[Row], offset: int) -> StepResult:
    """One optimizer step over the global batch that starts at row `offset` of the epoch's order.

    The host waits for the device once, at the end (`finish_step`): losses add up on the device and the
    label count is all-reduced there before the first micro-batch (the loss scale stays a device tensor)."""
    t0 = time.monotonic()
    env, plan, dev = s.env, s.plan, torch.device(s.engine.device or "cpu")
    mbs = micro_batches_for(env.rank, env.world_size, offset, ordered, s.lengths, plan.micro, plan.accum)
    if os.environ.get(LOG_SAMPLES_ENV):
        log_json(
            "samples", rank=env.rank, step=state.step + 1, ids=sorted(i for mb in mbs for r in mb for i in r)
        )
    pad_id = s.tok.pad_token_id if s.tok.pad_token_id is not None else 0
    local_labels, local_real = step_counts(mbs, s.examples)
    labels = on_device([float(local_labels)], dev)
    dist.all_reduce(labels)  # of the global batch
    # float32 like the loss, as when the scale was a Python number
    scale = (plan.accum * env.world_size / labels[0].clamp(min=1.0)).float()
    lr = s.sched.get_last_lr()[0]
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for b in device_batches(mbs, s.examples, pad_id, dev):
        out, _ = s.engine(b["input_ids"], b["position_ids"], b["targets"], b["label_pos"])
        s.engine.backward(out * scale)
        s.engine.step()
        loss_sum += out.detach()
    return finish_step(s, t0, lr, loss_sum.reshape(1), local_real, labels)


def finish_step(
    s: Setup,
    t0: float,
    lr: float,
    sums: torch.Tensor,
    local_real: int,
    per: torch.Tensor,
    stat_names: Sequence[str] = (),
) -> StepResult:
    """The end of every stage's optimizer step: one all-reduce of this rank's [loss sum, *stat sums, stop
    vote, real tokens], the grad norm, and one host sync for all of them. `sums` are float64 on the
    device; the step's loss and stats are their global totals divided by `per`, a global count already
    on the device (the batch's labels, or its pairs)."""
    dev = sums.device
    votes = torch.cat([sums, on_device([float(s.stop.requested), float(local_real)], dev)])
    dist.all_reduce(votes)  # [loss, *stats, ranks asked to stop, real tokens] of the global batch
    gn = s.engine.get_global_grad_norm()
    tail = [gn.detach().double().reshape(1).to(dev)] if isinstance(gn, torch.Tensor) else []
    values = torch.cat([votes, per.double().reshape(1), *tail]).tolist()
    n = len(sums)
    tot_loss, *stat_sums = values[:n]
    stop_votes, tot_real, count = values[n : n + 3]
    gn_dev, count = values[n + 3 :], max(count, 1.0)
    grad_norm = gn_dev[0] if gn_dev else (None if gn is None else float(gn))
    return StepResult(
        tot_loss / count,
        lr,
        grad_norm,
        int(tot_real),
        local_real,
        time.monotonic() - t0,
        stop_votes > 0,
        dict(zip(stat_names, (v / count for v in stat_sums), strict=True)),
    )


def report_step(s: Setup, state: TrainState, r: StepResult, start: int, t_run: float) -> None:
    """Metrics endpoint, JSON log and tracker for one finished step."""
    plan, m, done = s.plan, s.metrics, state.step
    tps = r.tokens / r.seconds if r.seconds > 0 else 0.0
    eta = (time.monotonic() - t_run) / (done - start) * (plan.total_steps - done)
    m.loss.set(r.loss)
    m.lr.set(r.lr)
    m.step.set(done)
    m.epoch.set(done / plan.steps_per_epoch)
    m.tokens.inc(r.local_tokens)
    m.tps.set(tps)
    m.eta.set(eta)
    if r.grad_norm is not None:
        m.grad_norm.set(r.grad_norm)
    m.record_align(r.stats)
    m.sample_memory()
    if s.is0 and (done % s.cfg.runtime.log_every_steps == 0 or done == plan.total_steps):
        log_json(
            "step",
            step=done,
            total_steps=plan.total_steps,
            loss=round(r.loss, 6),
            lr=r.lr,
            grad_norm=r.grad_norm,
            epoch=round(done / plan.steps_per_epoch, 4),
            tokens_per_second=round(tps, 1),
            tokens=r.tokens,
            step_seconds=round(r.seconds, 3),
            eta_seconds=round(eta, 1),
            **{k: round(v, 6) for k, v in r.stats.items()},
        )
        values = {
            "train_loss": r.loss,
            "learning_rate": r.lr,
            "tokens_per_second": tps,
            "grad_norm": r.grad_norm,
            "epoch": done / plan.steps_per_epoch,
            **r.stats,
        }
        if s.stage != Stage.TRAIN:  # one MLflow run holds every stage: the align steps' own names
            values = {f"{s.stage}_{k.removeprefix('train_')}": v for k, v in values.items()}
        s.tracker.metrics(values, done)


def save_checkpoint(s: Setup, state: TrainState) -> None:
    c0 = time.monotonic()
    checkpoint.save(s.engine, s.store, s.ident, state, s.env.rank, s.staging, s.cfg.output.keep_checkpoints)
    s.metrics.ckpt_seconds.observe(time.monotonic() - c0)
    s.metrics.checkpoint_step.set(state.step)
    if s.is0:
        log_json("checkpoint", step=state.step, seconds=round(time.monotonic() - c0, 3))


def export(s: Setup, state: TrainState, resumed_from: int | None) -> None:
    """The trained weights, summary and (train-only runs) the manifest."""
    cfg, plan = s.cfg, s.plan
    out_dir = os.path.join(s.staging, "final")
    kind = export_weights(s.engine, s.model, s.tok, cfg, s.env.rank, out_dir)
    if s.is0:
        s.store.upload_dir(out_dir, kind)
        summary = {
            "steps": plan.total_steps,
            "final_loss": state.loss,
            "tokens": state.tokens,
            "resumed_from": resumed_from,
            "plan": plan.__dict__,
            "data": s.report,
        }
        s.store.put_bytes(json.dumps(summary, indent=1).encode(), Layout.TRAIN_SUMMARY)
        s.tracker.metrics({"train_final_loss": state.loss, "train_tokens": state.tokens}, plan.total_steps)
        s.tracker.artifact(Layout.DATA_REPORT)
        if cfg.is_final(Stage.TRAIN):  # a train-only run: nothing runs after this stage
            s.tracker.flush()  # the run's id is in the store before the manifest lists it
            close_run(s.store, cfg, Stage.TRAIN)
            s.tracker.artifact(Layout.MANIFEST)
        termination_message(cfg, s.tracker.close(final=cfg.is_final(Stage.TRAIN)))
        log_json("done", kind=kind, steps=plan.total_steps, final_loss=state.loss)
    dist.barrier()


StepFn = Callable[[Setup, TrainState, list[Row], int], StepResult]


def loop(s: Setup, state: TrainState, step: StepFn) -> tuple[TrainState, StepResult | None]:
    """steps (report, checkpoint, stop on SIGTERM) from `state` to the plan's end; the train and align
    stages' shared loop. Returns the final state and the last step's result (None: nothing left to do)."""
    start, plan = state.step, s.plan
    s.metrics.total_steps.set(plan.total_steps)
    s.metrics.step.set(start)
    epoch_rows = plan.steps_per_epoch * plan.rows_per_step  # rows an epoch trains (the rest are dropped)
    order_epoch, ordered = -1, s.rows
    t_run = time.monotonic()
    r = None
    while state.step < plan.total_steps:
        epoch, offset = divmod(state.samples, epoch_rows)  # the cursor, whatever the world size
        if epoch != order_epoch:
            order_epoch, ordered = epoch, epoch_order(s.rows, s.cfg.training.seed, epoch)
        r = step(s, state, ordered, offset)
        state = TrainState(
            state.step + 1, state.samples + plan.rows_per_step, state.tokens + r.tokens, r.loss
        )
        report_step(s, state, r, start, t_run)
        due = state.step % s.cfg.training.checkpoint_steps == 0 or r.stop
        if due and state.step < plan.total_steps:
            save_checkpoint(s, state)
        if r.stop:
            s.tracker.close(timeout=30)
            raise Preempted(f"SIGTERM: checkpoint step-{state.step} saved, exiting for a retry")
        s.stop.hold(state.step)
    return state, r


def train(cfg: TrainerConfig) -> int:
    """setup -> resume -> steps (report, checkpoint) -> export."""
    s = setup(cfg)
    state = resume(s)
    start = state.step
    state, _ = loop(s, state, train_step)
    export(s, state, start or None)
    return int(ExitCode.OK)
