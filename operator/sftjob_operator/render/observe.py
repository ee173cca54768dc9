"""Slim, typed views of observed child Jobs and Pods, built from their API dicts (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sftjob_api.status import EvalResults

from .names import GROUP_SIZE_GATE, KUEUE_MIN_PARALLELISM, LABEL_GPUS_PER_NODE, LABEL_NODES

Obj = dict[str, Any]


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class JobObs:
    """What the phase machine needs from one batch/v1 Job."""

    name: str
    suspended: bool = False
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    completions: int = 1
    complete: bool = False
    failed_reason: str | None = None  # Job condition reason when Failed/FailureTarget is True
    failed_message: str = ""
    start_time: datetime | None = None
    uid: str = ""
    deleting: bool = False  # deletionTimestamp set (a group restart tears it down)
    # The train Job's shape as rendered, or as Kueue admitted it (labels; None on Jobs of operators before
    # elastic runs).
    nodes: int | None = None
    gpus_per_node: int | None = None
    # Kueue's partial admission (render/admission.py): the Job's parallelism and its min-parallelism
    # annotation (None: admitted whole).
    parallelism: int | None = None
    min_parallelism: int | None = None

    @property
    def finished(self) -> bool:
        return self.complete or self.failed_reason is not None


def _int_label(labels: dict[str, Any], key: str) -> int | None:
    value = str(labels.get(key) or "")
    return int(value) if value.isdigit() else None


def observe_job(job: Obj) -> JobObs:
    meta = job.get("metadata") or {}
    lab = meta.get("labels") or {}
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    complete = False
    failed_reason: str | None = None
    failed_message = ""
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        ctype = cond.get("type")
        if ctype in ("Complete", "SuccessCriteriaMet"):
            complete = True
        elif ctype in ("Failed", "FailureTarget") and failed_reason is None:
            failed_reason = str(cond.get("reason") or "Failed")
            failed_message = str(cond.get("message") or "")
        elif ctype == "Failed":
            # Prefer the final condition's wording over FailureTarget's when both are present.
            failed_reason = str(cond.get("reason") or failed_reason)
            failed_message = str(cond.get("message") or failed_message)
    return JobObs(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        suspended=bool(spec.get("suspend")),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        completions=int(spec.get("completions") or 1),
        complete=complete and failed_reason is None,
        failed_reason=failed_reason,
        failed_message=failed_message,
        start_time=parse_time(status.get("startTime")),
        deleting=bool(meta.get("deletionTimestamp")),
        nodes=_int_label(lab, LABEL_NODES),
        gpus_per_node=_int_label(lab, LABEL_GPUS_PER_NODE),
        parallelism=int(spec["parallelism"]) if spec.get("parallelism") is not None else None,
        min_parallelism=_int_label(meta.get("annotations") or {}, KUEUE_MIN_PARALLELISM),
    )


@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str = ""


@dataclass(frozen=True)
class PodObs:
    """What progress and stuck detection need from one pod."""

    name: str
    stage: str
    phase: str
    created: datetime | None
    index: int | None = None
    ip: str | None = None
    deleting: bool = False
    unschedulable_message: str | None = None
    scheduled: bool = False
    waiting: tuple[Waiting, ...] = ()
    termination_message: str | None = None
    exit_code: int | None = None
    labels: tuple[tuple[str, str], ...] = field(default=())
    terminated_reason: str | None = None  # the container's, e.g. OOMKilled, Error
    reason: str | None = None  # the pod's status.reason, e.g. Evicted
    disruption: str | None = None  # condition DisruptionTarget=True: "<reason>: <message>"
    node: str | None = None  # spec.nodeName
    signal: int | None = None  # the container's terminated.signal (set when a signal ended its main process)
    finished_at: datetime | None = None  # the container's terminated.finishedAt
    gated: bool = False  # held by the operator's scheduling gate until it sets the group's size


def observe_pod(pod: Obj, stage_label: str, index_label: str) -> PodObs:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    lab = meta.get("labels") or {}
    unschedulable: str | None = None
    scheduled = False
    disruption: str | None = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disruption = f"{cond.get('reason') or 'DisruptionTarget'}: {cond.get('message') or ''}".rstrip(
                ": "
            )
        if cond.get("type") == "PodScheduled":
            if cond.get("status") == "True":
                scheduled = True
            elif cond.get("reason") == "Unschedulable":
                unschedulable = str(cond.get("message") or "Unschedulable")
    waiting: list[Waiting] = []
    term_msg: str | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None
    signal: int | None = None
    finished_at: datetime | None = None
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("waiting"):
            w = state["waiting"]
            waiting.append(Waiting(str(w.get("reason") or ""), str(w.get("message") or "")))
        if state.get("terminated"):
            t = state["terminated"]
            if t.get("message"):
                term_msg = str(t["message"])
            if t.get("exitCode") is not None:
                exit_code = int(t["exitCode"])
            terminated_reason = str(t.get("reason") or "") or terminated_reason
            if t.get("signal"):
                signal = int(t["signal"])
            finished_at = parse_time(t.get("finishedAt")) or finished_at
    raw_index = lab.get(index_label) or (meta.get("annotations") or {}).get(index_label)
    return PodObs(
        name=str(meta.get("name", "")),
        stage=str(lab.get(stage_label, "")),
        phase=str(status.get("phase") or "Pending"),
        created=parse_time(meta.get("creationTimestamp")),
        index=int(raw_index) if raw_index is not None and str(raw_index).isdigit() else None,
        ip=status.get("podIP") or None,
        deleting=bool(meta.get("deletionTimestamp")),
        unschedulable_message=unschedulable,
        scheduled=scheduled,
        waiting=tuple(waiting),
        termination_message=term_msg,
        exit_code=exit_code,
        terminated_reason=terminated_reason,
        reason=status.get("reason") or None,
        disruption=disruption,
        node=(pod.get("spec") or {}).get("nodeName") or None,
        signal=signal,
        finished_at=finished_at,
        gated=any(
            g.get("name") == GROUP_SIZE_GATE for g in (pod.get("spec") or {}).get("schedulingGates") or []
        ),
    )


def parse_eval_results(message: str | None) -> EvalResults | None:
    """The eval results the eval pod wrote as its termination message: `{"evalResults": {...}}` (the last
    line of the message); None when the message holds none."""
    if not message or not message.strip():
        return None
    try:
        data = json.loads(message.strip().splitlines()[-1])
        return EvalResults.model_validate(data["evalResults"])
    except (ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        return None
