"""Kubernetes-style conditions derived from a phase decision (pure; `now` is passed in)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Literal, get_args

from sftjob_api import STAGE_TABLE, Condition, Stage
from sftjob_api.stage_table import StageRow
from sftjob_api.status import ConditionType

from .phase import FAILED, SUCCEEDED, SUSPENDED, Decision, Observed

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


Put = Callable[[ConditionType, Status, str, str], None]


def _single_pod_condition(put: Put, row: StageRow, decision: Decision, obs: Observed) -> None:
    """A stage's outcome condition (Curated, Aligned, Evaluated, Merged): True once its Job completed (eval:
    and every gate held), False with the reason while it runs or once it failed; `row.disabled` (or absent)
    when the spec skips it."""
    if row.stage not in obs.stages:
        if row.disabled is not None:
            put(row.condition, "False", "Disabled", row.disabled)
        return
    job = obs.jobs.get(row.stage)
    gated = row.stage == Stage.EVAL
    if job is not None and job.complete and not (gated and obs.gate_failures):
        reason, message = row.done
        held = gated and obs.gate_failures == ()  # known, and empty
        put(row.condition, "True", reason, message + (" and every gate held" if held else ""))
    elif decision.reason in row.failed_reasons:
        put(row.condition, "False", decision.reason, decision.message)
    elif decision.phase == row.phase:
        # a group's reason says more (Restarting, Suspending, ...): render/phase.py `_group`
        put(row.condition, "False", decision.reason if row.group else row.running, decision.message)


def _group_condition(put: Put, row: StageRow, decision: Decision, obs: Observed, present: bool) -> None:
    """The training group's condition: True while the run is in its phase (the reason says how it goes),
    False once its Job completed, or with the reason of the phase the run is in (kept when the run fails
    before it started: `present`)."""
    job = obs.jobs.get(row.stage)
    if decision.phase == row.phase:
        put(row.condition, "True", decision.reason, decision.message)
    elif job is not None and job.complete:
        put(row.condition, "False", *row.done)
    elif decision.phase != FAILED or present:
        put(row.condition, "False", decision.reason, decision.message)


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

    for row in STAGE_TABLE.values():
        # A condition named after the phase (Training) is True while the run is in it; one named after the
        # outcome (Aligned, Evaluated, ...) is True once the stage's Job completed.
        if row.condition == row.phase:
            _group_condition(put, row, decision, obs, get_condition(conds, row.condition) is not None)
        else:
            _single_pod_condition(put, row, decision, obs)

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
