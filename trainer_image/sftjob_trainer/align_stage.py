"""The align stage: `python -m sftjob_trainer launch [torchrun args] align --config PATH` (docs/alignment.md).

DPO on spec.alignment's preference pairs, starting from the SFT result, under the training stage's own
machinery (train_setup.setup, train.loop: torchrun, DeepSpeed ZeRO-3, checkpoints with a COMPLETE marker,
run identity, SIGTERM, resume), with spec.alignment_training()'s settings:

1. the policy: the base model with the method's adapter, warm-started from the SFT adapter/ (lora, qlora),
   or the SFT model/ itself (full);
2. the reference is that same initial policy: before the first update every rank computes the summed
   log-probabilities of its share of the train and eval pairs, they are gathered and rank 0 stores them in
   align/reference_logps.json with a fingerprint of the pairs. A resumed run reads them back (the policy has
   moved since). No second copy of the model is ever held, for lora and full alike;
3. steps: each micro-batch holds both responses of its pairs (dpo.collate_pairs); the loss is the mean of
   the per-pair DPO losses over the global batch; the training metrics plus the ALIGN_* gauges per step;
4. aligned/ (adapter or model + tokenizer) and align/summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist

from sftjob_api import Layout, Stage
from sftjob_api.exit_codes import ExitCode, PermanentError
from sftjob_api.manifest import close_run
from sftjob_api.storage import Store, open_store
from sftjob_api.trainer_config import TrainerConfig

from . import checkpoint
from .checkpoint import TrainState
from .config import DistEnv
from .dpo import (
    STATS,
    Pair,
    PolicyLogps,
    collate_pairs,
    dpo_loss,
    load_pairs,
    pair_logps,
    pair_tokens,
    pairs_digest,
    stat_sums,
)
from .metrics import TrainerMetrics, log_json
from .packing import Row, micro_batches_for
from .tracking import termination_message
from .train import StepResult, export_weights, finish_step, loop, on_device, resume, to_device
from .train_setup import Setup, StageData, plan_single_rows, setup

# {"train": [[chosen, rejected], ...], "eval": [...]}: the reference's summed log-probabilities per pair
RefLogps = dict[str, list[list[float]]]


def align_config(cfg: TrainerConfig, policy_dir: str | None) -> TrainerConfig:
    """cfg with the align stage's training settings (and, for full, the SFT model as the model to load)."""
    training = cfg.alignment_training().model_copy(update={"resume_from": None})
    update: dict[str, Any] = {"training": training}
    if policy_dir is not None:
        update["model"] = cfg.model.model_copy(update={"uri": policy_dir})
        update["run"] = cfg.run.model_copy(update={"model_uri": cfg.base_model_reference()})
    return cfg.model_copy(update=update)


def prepare_pairs(cfg: TrainerConfig, tok: Any, env: DistEnv, metrics: TrainerMetrics) -> StageData:
    """Every rank reads all pairs (small next to the model); one pair per row, planned like training."""
    data = load_pairs(cfg, tok)
    if not data.train:
        raise PermanentError("spec.alignment.dataset: no preference pairs left to train on")
    try:
        rows, plan = plan_single_rows(cfg, len(data.train), env.world_size)
    except PermanentError as e:  # its message names spec.training's fields: the defaults of these
        raise PermanentError(f"spec.alignment.training (defaults from spec.training), pairs: {e}") from e
    for reason, n in (data.report.get("dropped") or {}).items():  # the SFT data's drop counter, as in train
        metrics.dropped.labels(**metrics.labels, reason=reason).inc(n)
    if env.rank == 0:
        log_json(
            "align_data",
            report=data.report,
            train_pairs=len(data.train),
            eval_pairs=len(data.eval),
            plan=plan.__dict__,
        )
    al = cfg.alignment
    assert al is not None
    return StageData(
        data.train,
        [pair_tokens(p) for p in data.train],
        rows,
        plan,
        dict(data.report),
        pairs_digest(data.train),
        {
            "spec.alignment.loss": al.loss,
            "spec.alignment.beta": al.beta,
            # only when set: checkpoints written before the field existed keep their fingerprint
            **({"spec.alignment.sftLossWeight": al.sft_loss_weight} if al.sft_loss_weight else {}),
        },
        data.eval,
    )


def train_pairs(s: Setup) -> Sequence[Pair]:
    """The align stage's Setup.examples: its training pairs."""
    return cast(Sequence[Pair], s.examples)


def policy_wrapper(model: Any, cfg: TrainerConfig) -> Any:
    return PolicyLogps(model)


def reference_fingerprint(s: Setup) -> dict[str, Any]:
    return {
        "run": s.ident.run_id,
        "train": pairs_digest(train_pairs(s)),
        "eval": pairs_digest(s.held_out),
    }


def split_logps(s: Setup, pairs: Sequence[Pair]) -> list[list[float]]:
    """[chosen, rejected] summed log-probabilities of every pair under the current weights, without updating
    them. Rank r scores micro-batches r, r + world, ...; every rank runs the same number of forward passes
    (ZeRO-3 gathers each layer's weights collectively), a rank without pairs left scores pair 0 and drops it."""
    rank, world, micro = s.env.rank, s.env.world_size, s.plan.micro
    dev = torch.device(s.engine.device or "cpu")
    pad_id = s.tok.pad_token_id if s.tok.pad_token_id is not None else 0
    mine: list[tuple[int, float, float]] = []
    n_batches = -(-len(pairs) // (micro * world))
    s.engine.eval()  # no dropout: the reference is the policy itself
    with torch.no_grad():
        for b in range(n_batches):
            first = (b * world + rank) * micro
            idx = list(range(first, min(first + micro, len(pairs))))
            batch = collate_pairs([pairs[i] for i in idx or [0]], pad_id)
            batch = {k: to_device(v, dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            chosen, rejected, _, _ = pair_logps(s.engine, batch)
            if idx:
                mine += zip(idx, chosen.tolist(), rejected.tolist(), strict=True)
    s.engine.train()
    every: list[list[tuple[int, float, float]]] = [[] for _ in range(world)]
    dist.all_gather_object(every, mine)
    table: list[list[float]] = [[0.0, 0.0] for _ in pairs]
    for i, c, r in (x for part in every for x in part):
        table[i] = [c, r]
    return table


def reference_logps(s: Setup, state: TrainState) -> RefLogps:
    """The reference's log-probabilities of the train and eval pairs: read back from align/ when this run
    stored them for these pairs, else computed now, with the initial policy (module docstring)."""
    fp = reference_fingerprint(s)
    doc = s.store.read_json(Layout.ALIGN_REFERENCE)
    if doc is not None and doc.get("fingerprint") == fp:
        if s.is0:
            log_json("reference_logps", reused=True, train=len(doc["train"]), eval=len(doc["eval"]))
        return {"train": doc["train"], "eval": doc["eval"]}
    if state.step > 0:  # the policy has moved: it is no longer the reference
        raise PermanentError(
            f"{Layout.ALIGN_REFERENCE} is missing or belongs to other pairs or another run, but this run resumes"
            f" alignment at step {state.step}: the reference cannot be recomputed from a moved policy. Start the"
            " alignment over (delete align/checkpoints/) or restore the file"
        )
    t0 = time.monotonic()
    ref = {"train": split_logps(s, train_pairs(s)), "eval": split_logps(s, s.held_out)}
    if s.is0:
        doc = {"fingerprint": fp, **ref}
        s.store.put_bytes(json.dumps(doc).encode(), Layout.ALIGN_REFERENCE)
        log_json(
            "reference_logps",
            reused=False,
            train=len(ref["train"]),
            eval=len(ref["eval"]),
            seconds=round(time.monotonic() - t0, 2),
        )
    dist.barrier()
    return ref


def dpo_step(
    s: Setup, state: TrainState, ordered: list[Row], offset: int, ref: list[list[float]]
) -> StepResult:
    """One optimizer step over the global batch of pairs that starts at row `offset` of the epoch's order:
    the loss is the mean per-pair DPO loss over the whole global batch (its size is fixed: no count to
    all-reduce first); it ends as train.train_step does (`finish_step`)."""
    t0 = time.monotonic()
    al = s.cfg.alignment
    assert al is not None
    env, plan, dev = s.env, s.plan, torch.device(s.engine.device or "cpu")
    pairs_per_step = plan.rows_per_step
    mbs = micro_batches_for(env.rank, env.world_size, offset, ordered, s.lengths, plan.micro, plan.accum)
    pad_id = s.tok.pad_token_id if s.tok.pad_token_id is not None else 0
    # DeepSpeed averages over micro-steps and ranks: undo it, then divide by the global batch's pairs
    scale = plan.accum * env.world_size / pairs_per_step
    lr = s.sched.get_last_lr()[0]
    sums = torch.zeros(1 + len(STATS), dtype=torch.float64, device=dev)  # [loss, *STATS]
    local_real = 0
    for mb in mbs:
        idx = [i for row in mb for i in row]
        b = collate_pairs([train_pairs(s)[i] for i in idx], pad_id)
        local_real += int(b["real_tokens"])
        b = {k: to_device(v, dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        pc, pj, nc, nj = pair_logps(s.engine, b)
        refs = on_device([x for i in idx for x in ref[i]], dev).float().view(-1, 2)
        out = dpo_loss(pc, pj, refs[:, 0], refs[:, 1], al.beta, al.loss, nc, nj, al.sft_loss_weight)
        loss = out.losses.sum()
        s.engine.backward(loss * scale)
        s.engine.step()
        sums += torch.cat([loss.detach().double().reshape(1), stat_sums(out, pc, pj, refs[:, 0], refs[:, 1])])
    return finish_step(s, t0, lr, sums, local_real, on_device([float(pairs_per_step)], dev), STATS)


def fetch_sft_model(cfg: TrainerConfig, store: Store) -> str:
    """Method full: the SFT model/ in this rank's own directory (pods share no filesystem)."""
    local = os.path.join(cfg.runtime.work_dir, f"sft-model-rank{os.environ.get('RANK', '0')}")
    shutil.rmtree(local, ignore_errors=True)
    if not store.download_dir(Layout.MODEL, local):
        raise PermanentError(f"nothing under {Layout.MODEL}/: alignment starts from training's result")
    return local


def warm_start_from_sft(s: Setup) -> None:
    """lora/qlora: the adapter training wrote becomes the trainable adapter's starting point."""
    if not s.store.exists(f"{Layout.ADAPTER}/adapter_model.safetensors"):
        raise PermanentError(
            f"no {Layout.ADAPTER}/adapter_model.safetensors: alignment starts from training's result"
        )
    staging = os.path.join(s.staging, f"rank{s.env.rank}")  # local ranks share the work directory
    tensors = checkpoint.warm_start_tensors(s.store, Layout.ADAPTER, f"{Layout.ADAPTER}/", staging)
    n = checkpoint.warm_start(s.engine, tensors)
    if s.is0:
        log_json("policy_from_sft", source=f"{Layout.ADAPTER}/", tensors=n)


def export_aligned(
    s: Setup,
    cfg: TrainerConfig,
    state: TrainState,
    resumed_from: int | None,
    ref: RefLogps,
    last: StepResult | None,
) -> None:
    """aligned/, align/summary.json; the manifest when nothing runs after this stage. `cfg`: the run's own
    config (s.cfg carries the align stage's training settings)."""
    plan = s.plan
    out_dir = os.path.join(s.staging, "aligned")
    export_weights(s.engine, s.model, s.tok, cfg, s.env.rank, out_dir)
    if s.is0:
        s.store.upload_dir(out_dir, Layout.ALIGNED)
        al = cfg.alignment
        assert al is not None
        summary = {
            "steps": plan.total_steps,
            "final_loss": state.loss,
            "final": last.stats if last else None,
            "tokens": state.tokens,
            "resumed_from": resumed_from,
            "loss": al.loss,
            "beta": al.beta,
            "sft_loss_weight": al.sft_loss_weight,
            "plan": plan.__dict__,
            "pairs": {"train": len(ref["train"]), "eval": len(ref["eval"])},
            "data": s.report,
        }
        s.store.put_bytes(json.dumps(summary, indent=1).encode(), Layout.ALIGN_SUMMARY)
        s.tracker.metrics({"align_final_loss": state.loss, "align_tokens": state.tokens}, plan.total_steps)
        final = cfg.is_final(Stage.ALIGN)
        if final:  # nothing runs after this stage
            s.tracker.flush()
            close_run(s.store, cfg, Stage.ALIGN)
            s.tracker.artifact(Layout.MANIFEST)
        termination_message(cfg, s.tracker.close(final=final))
        log_json("done", kind=Layout.ALIGNED, steps=plan.total_steps, final_loss=state.loss)
    dist.barrier()


def main(cfg: TrainerConfig) -> int:
    """setup -> resume (or the SFT weights) -> reference log-probabilities -> steps -> aligned/."""
    if cfg.alignment is None:
        log_json("align_skipped", reason="spec.alignment is not set")
        return int(ExitCode.OK)
    policy_dir = None
    if cfg.method.type == "full":
        policy_dir = fetch_sft_model(cfg, open_store(cfg.run.output_root, cfg.output))
    s = setup(align_config(cfg, policy_dir), Stage.ALIGN, prepare_pairs, policy_wrapper)
    state = resume(s)
    if state.step == 0 and cfg.method.type != "full":
        warm_start_from_sft(s)
    ref = reference_logps(s, state)
    start = state.step
    state, last = loop(s, state, lambda s_, st, order, off: dpo_step(s_, st, order, off, ref["train"]))
    export_aligned(s, cfg, state, start or None, ref, last)
    return int(ExitCode.OK)
