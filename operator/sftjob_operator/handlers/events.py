"""Events and metrics for what a reconcile changed: phase transitions, group restarts, stuck pods."""

from __future__ import annotations

import logging
from datetime import datetime

from sftjob_api import SFTJobStatus

from .. import metrics
from ..render import phase as ph
from ..render.conditions import get_condition
from ..render.observe import parse_time
from ..render.recovery import cause_kind
from ..render.stuck import Stuck
from .kube import Kube
from .state import Obj

log = logging.getLogger("sftjob_operator.reconcile")


# Phases whose arrival (or, for Suspended, departure) is posted as an Event. The progress phases in between
# (Pending, Curating, Training, Evaluating, Merging) are in status.conditions with their transition times;
# an Event for each would cost the apiserver one write per phase per SFTJob (issue 17 counts them).
ANNOUNCED = (ph.SUCCEEDED, ph.FAILED, ph.SUSPENDED)


def announced(prev_phase: str | None, new_phase: str) -> bool:
    """Whether a change of phase or reason gets an Event: an end, a suspension, a resumption; and a new
    reason of Failed."""
    if prev_phase == new_phase:
        return new_phase == ph.FAILED
    return new_phase in ANNOUNCED or prev_phase == ph.SUSPENDED


def record_transition(
    kube: Kube,
    body: Obj,
    prev: SFTJobStatus,
    status: SFTJobStatus,
    decision: ph.Decision,
    stuck: Stuck | None,
    now: datetime,
) -> None:
    prev_phase = prev.phase
    new_phase = decision.phase
    if status.restarts > prev.restarts:
        metrics.RESTARTS.inc(status.restarts - prev.restarts)
    new = status.recoveries[-1] if status.recoveries else None
    if new is not None and new.train_job_uid not in {r.train_job_uid for r in prev.recoveries}:
        cause = cause_kind(new)
        metrics.RECOVERIES.labels(cause=cause).inc()
        if new.to_world_size is not None:  # render/elastic.py
            grew = new.to_world_size > (new.from_world_size or 0)
            kube.post_event(body, "Normal" if grew else "Warning", "GroupResized", decision.message)
        else:
            kube.post_event(
                body, "Warning", "TrainerRestarted", f"group restart ({cause}): {decision.message}"
            )
    if prev_phase != new_phase or prev.reason != decision.reason:
        if prev_phase != new_phase:
            metrics.TRANSITIONS.labels(from_phase=prev_phase or "", to_phase=new_phase).inc()
        if new_phase == ph.TRAINING and prev.training_start_time is None:
            created = parse_time(body["metadata"].get("creationTimestamp"))
            if created is not None:
                metrics.TIME_TO_TRAINING.observe(max((now - created).total_seconds(), 0.0))
        etype = "Warning" if new_phase == ph.FAILED else "Normal"
        if announced(prev_phase, new_phase):
            kube.post_event(
                body,
                etype,
                decision.reason or new_phase,
                f"{prev_phase or 'New'} -> {new_phase}: {decision.message}",
            )
        log.info(
            "%s/%s: %s -> %s (%s) %s",
            body["metadata"]["namespace"],
            body["metadata"]["name"],
            prev_phase,
            new_phase,
            decision.reason,
            decision.message,
        )
    prev_stuck = get_condition(prev.conditions, "Stuck")
    if stuck is not None and (prev_stuck is None or prev_stuck.status != "True"):
        kube.post_event(body, "Warning", f"Stuck{stuck.reason}", stuck.message)
