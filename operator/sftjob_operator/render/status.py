"""The SFTJob status the reconcile writes, and the eval outcome it is built from (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..api import SFTJobSpec
from . import phase as ph
from .artifacts import artifacts
from .conditions import derive_conditions, get_condition, iso, set_condition
from .names import STAGE_EVAL, ChildNames
from .observe import JobObs, PodObs, parse_eval_results
from .stuck import Stuck

Obj = dict[str, Any]

# Status keys the reconcile owns; progress is written by the progress reader.
OWNED_STATUS_KEYS = (
    "phase",
    "reason",
    "message",
    "conditions",
    "observedGeneration",
    "startTime",
    "trainingStartTime",
    "completionTime",
    "evalResults",
    "artifacts",
    "restarts",
    "children",
)


def owned_by(obj: Obj, uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])


def eval_loss(status: Obj) -> float | None:
    value = (status.get("evalResults") or {}).get("evalLoss")
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class EvalOutcome:
    """What a finished eval Job says: its results, gate failures (None: not known), a gate exit message."""

    results: dict[str, float] | None = None
    gate_failures: tuple[str, ...] | None = None
    gate_exit: str | None = None


def eval_outcome(
    spec: SFTJobSpec, eval_job: JobObs | None, pods: list[PodObs], prev: Obj, gate_exit_code: int
) -> EvalOutcome:
    if eval_job is None or not eval_job.finished:
        return EvalOutcome()
    eval_pods = [p for p in pods if p.stage == STAGE_EVAL]
    msg = next(
        (p.termination_message for p in eval_pods if p.phase == "Succeeded" and p.termination_message),
        None,
    )
    # The trainer enforces the gates itself (exit code EVAL_GATE_FAILED); when the eval pod also
    # reports its results (JSON termination message) the operator records them and re-checks.
    results = parse_eval_results(msg) or (prev.get("evalResults") or None)
    gates = spec.eval.gates
    gate_failures: tuple[str, ...] | None = None
    if eval_job.complete:
        gate_failures = (
            ph.evaluate_gates(
                results,
                gates.max_eval_loss,
                gates.max_perplexity,
                gates.min_rouge_l,
                gates.min_exact_match,
            )
            if gates is not None and results
            else ()
        )
    gate_exit: str | None = None
    gate_pod = next((p for p in eval_pods if p.exit_code == gate_exit_code), None)
    if eval_job.failed_reason is not None and gate_pod is not None:
        gate_exit = (gate_pod.termination_message or "").strip() or f"eval exited with code {gate_exit_code}"
    return EvalOutcome(results, gate_failures, gate_exit)


def build_status(
    body: Obj,
    prev: Obj,
    spec: SFTJobSpec | None,
    decision: ph.Decision,
    obs: ph.Observed,
    eval_results: dict[str, float] | None,
    stuck: Stuck | None,
    now: datetime,
    generation: int | None,
    names: ChildNames,
) -> Obj:
    """Every status key the reconcile owns (progress is the progress reader's)."""
    meta = body["metadata"]
    conds = derive_conditions(list(prev.get("conditions") or []), decision, obs, now, generation)
    if stuck is not None and decision.phase not in (ph.SUCCEEDED,):
        conds = set_condition(conds, "Stuck", "True", stuck.reason, stuck.message, now, generation)
    elif get_condition(conds, "Stuck") is not None:
        conds = set_condition(conds, "Stuck", "False", "Progressing", "no pod is stuck", now, generation)
    status: Obj = {
        "phase": decision.phase,
        "reason": decision.reason,
        "message": decision.message,
        "conditions": conds,
        "observedGeneration": generation,
        "startTime": prev.get("startTime") or meta.get("creationTimestamp") or iso(now),
        "restarts": max(int(prev.get("restarts") or 0), obs.train.failed if obs.train else 0),
    }
    if spec is not None and decision.reason != ph.R_INVALID_SPEC:
        arts = artifacts(spec, meta["namespace"], meta["name"])
        # latestCheckpoint is the progress reader's (from the trainer's metrics): keep it while it is
        # under this spec's checkpoints prefix.
        latest = (prev.get("artifacts") or {}).get("latestCheckpoint")
        if isinstance(latest, str) and latest.startswith(arts["checkpoints"]):
            arts["latestCheckpoint"] = latest
        status["artifacts"] = arts
        children = {"configMap": names.config_map, "service": names.service, "trainJob": names.train_job}
        if obs.eval is not None:
            children["evalJob"] = names.eval_job
        if obs.merge is not None:
            children["mergeJob"] = names.merge_job
        status["children"] = children
    if prev.get("trainingStartTime"):
        status["trainingStartTime"] = prev["trainingStartTime"]
    elif decision.phase == ph.TRAINING or (obs.train is not None and obs.train.complete):
        status["trainingStartTime"] = iso(now)
    if eval_results is not None:
        er: Obj = dict(eval_results)
        if obs.gate_failures is not None:
            er["gatesPassed"] = not obs.gate_failures
            er["failedGates"] = list(obs.gate_failures)
        status["evalResults"] = er
    if decision.phase in ph.TERMINAL:
        status["completionTime"] = prev.get("completionTime") or iso(now)
    return status
