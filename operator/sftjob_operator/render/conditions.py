"""Kubernetes-style conditions derived from a phase decision (pure; `now` is passed in)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from sftjob_api import Condition, Reason, Stage
from sftjob_api.status import ConditionType

from .phase import (
    CURATING,
    EVALUATING,
    FAILED,
    MERGING,
    SUCCEEDED,
    SUSPENDED,
    TRAINING,
    Decision,
    Observed,
)

CONDITION_ORDER: tuple[ConditionType, ...] = get_args(ConditionType)
Status = Literal["True", "False", "Unknown"]


def set_condition(
    conds: list[Condition],
    ctype: ConditionType,
    status: Status,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Return conds with `ctype` set; lastTransitionTime changes only when the status does."""
    old = get_condition(conds, ctype)
    changed = old is None or old.status != status
    new = Condition(
        type=ctype,
        status=status,
        reason=reason[:1024],  # the CRD's bounds: a longer text would fail the whole status write
        message=message[:32768],
        last_transition_time=now if changed or old is None else old.last_transition_time or now,
        observed_generation=generation,
    )
    out = [c for c in conds if c.type != ctype] + [new]
    return sorted(out, key=lambda c: CONDITION_ORDER.index(c.type))


def get_condition(conds: list[Condition], ctype: ConditionType) -> Condition | None:
    return next((c for c in conds if c.type == ctype), None)


def derive_conditions(
    prev: list[Condition], decision: Decision, obs: Observed, now: datetime, generation: int | None
) -> list[Condition]:
    """All conditions except Stuck (set by stuck detection), from the decision and what was observed."""
    conds = list(prev)
    g = generation

    def put(ctype: ConditionType, status: Status, reason: str, message: str = "") -> None:
        nonlocal conds
        conds = set_condition(conds, ctype, status, reason, message, now, g)

    phase = decision.phase
    if obs.train is not None:
        put("Created", "True", "ChildrenCreated", f"training Job {obs.train.name} created")
    elif obs.curate is not None:
        put("Created", "True", "ChildrenCreated", f"curation Job {obs.curate.name} created")
    elif phase != FAILED:
        put("Created", "False", decision.reason, decision.message)

    # Curated: absent for a spec without a curate stage.
    if Stage.CURATE in obs.stages:
        if obs.curate is not None and obs.curate.complete:
            put("Curated", "True", "CurationCompleted", "curation Job completed")
        elif decision.reason == Reason.CURATE_FAILED:
            put("Curated", "False", decision.reason, decision.message)
        elif phase == CURATING:
            put("Curated", "False", "CurateRunning", decision.message)

    train_done = obs.train is not None and obs.train.complete
    if phase == TRAINING:
        put("Training", "True", decision.reason, decision.message)
    elif train_done:
        put("Training", "False", "TrainingCompleted", "training Job completed")
    elif phase != FAILED or get_condition(conds, "Training") is not None:
        put("Training", "False", decision.reason, decision.message)

    if Stage.EVAL not in obs.stages:
        put("Evaluated", "False", "Disabled", "spec.eval.enabled is false")
    elif obs.eval is not None and obs.eval.complete and not obs.gate_failures:
        put(
            "Evaluated",
            "True",
            "EvalPassed",
            "evaluation completed" + (" and every gate held" if obs.gate_failures == () else ""),
        )
    elif decision.reason in (Reason.EVAL_FAILED, Reason.GATE_FAILED):
        put("Evaluated", "False", decision.reason, decision.message)
    elif phase == EVALUATING:
        put("Evaluated", "False", "EvalRunning", decision.message)

    if Stage.MERGE not in obs.stages:
        put("Merged", "False", "Disabled", "merge disabled (spec.merge.enabled false or method full)")
    elif obs.merge is not None and obs.merge.complete:
        put("Merged", "True", "MergeCompleted", "merged model written")
    elif decision.reason == Reason.MERGE_FAILED:
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
