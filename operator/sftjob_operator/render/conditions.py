"""Kubernetes-style conditions derived from a phase decision (pure; `now` is passed in)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .phase import (
    EVALUATING,
    FAILED,
    MERGING,
    R_EVAL_FAILED,
    R_GATE_FAILED,
    R_MERGE_FAILED,
    SUCCEEDED,
    SUSPENDED,
    TRAINING,
    Decision,
    Observed,
)

Cond = dict[str, Any]
CONDITION_ORDER = ("Created", "Training", "Evaluated", "Merged", "Succeeded", "Failed", "Suspended", "Stuck")


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conds: list[Cond],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Cond]:
    """Return conds with `ctype` set; lastTransitionTime changes only when the status does."""
    out: list[Cond] = []
    found = False
    for c in conds:
        if c.get("type") != ctype:
            out.append(c)
            continue
        found = True
        changed = c.get("status") != status
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": iso(now) if changed else c.get("lastTransitionTime") or iso(now),
                "observedGeneration": generation,
            }
        )
    if not found:
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": iso(now),
                "observedGeneration": generation,
            }
        )
    order = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted(out, key=lambda c: order.get(str(c.get("type")), len(order)))


def get_condition(conds: list[Cond], ctype: str) -> Cond | None:
    return next((c for c in conds if c.get("type") == ctype), None)


def derive_conditions(
    prev: list[Cond], decision: Decision, obs: Observed, now: datetime, generation: int | None
) -> list[Cond]:
    """All conditions except Stuck (set by stuck detection), from the decision and what was observed."""
    conds = [dict(c) for c in prev]
    g = generation

    def put(ctype: str, status: str, reason: str, message: str = "") -> None:
        nonlocal conds
        conds = set_condition(conds, ctype, status, reason, message, now, g)

    phase = decision.phase
    if obs.train is not None:
        put("Created", "True", "ChildrenCreated", f"training Job {obs.train.name} created")
    elif phase != FAILED:
        put("Created", "False", decision.reason, decision.message)

    train_done = obs.train is not None and obs.train.complete
    if phase == TRAINING:
        put("Training", "True", decision.reason, decision.message)
    elif train_done:
        put("Training", "False", "TrainingCompleted", "training Job completed")
    elif phase != FAILED or get_condition(conds, "Training") is not None:
        put("Training", "False", decision.reason, decision.message)

    if not obs.eval_enabled:
        put("Evaluated", "False", "Disabled", "spec.eval.enabled is false")
    elif obs.eval is not None and obs.eval.complete and not obs.gate_failures:
        put(
            "Evaluated",
            "True",
            "EvalPassed",
            "evaluation completed" + (" and every gate held" if obs.gate_failures == () else ""),
        )
    elif decision.reason in (R_EVAL_FAILED, R_GATE_FAILED):
        put("Evaluated", "False", decision.reason, decision.message)
    elif phase == EVALUATING:
        put("Evaluated", "False", "EvalRunning", decision.message)

    if not obs.merge_enabled:
        put("Merged", "False", "Disabled", "merge disabled (spec.merge.enabled false or method full)")
    elif obs.merge is not None and obs.merge.complete:
        put("Merged", "True", "MergeCompleted", "merged model written")
    elif decision.reason == R_MERGE_FAILED:
        put("Merged", "False", decision.reason, decision.message)
    elif phase == MERGING:
        put("Merged", "False", "MergeRunning", decision.message)

    # Succeeded and Failed appear when the run ends (one True, the other False), as kubectl wait expects.
    if phase == SUCCEEDED:
        put("Succeeded", "True", decision.reason, decision.message)
        put("Failed", "False", decision.reason, "the run succeeded")
    elif phase == FAILED:
        put("Failed", "True", decision.reason, decision.message)
        put("Succeeded", "False", decision.reason, decision.message)

    if phase == SUSPENDED:
        put("Suspended", "True", decision.reason, decision.message)
    elif get_condition(conds, "Suspended") is not None:
        put("Suspended", "False", "Resumed", "spec.suspend is false")
    return conds
