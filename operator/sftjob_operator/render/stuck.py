"""Stuck detection: pods Pending past runPolicy.stuckPendingTimeoutSeconds, with the cause named (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .observe import PodObs

IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")


@dataclass(frozen=True)
class Stuck:
    reason: str  # Unschedulable, ImagePullBackOff, QuotaExceeded, ...
    message: str
    since: datetime  # when the oldest stuck pod (or the Job) started waiting
    pod: str | None = None


@dataclass(frozen=True)
class JobEvent:
    """A Warning Event on a child Job (FailedCreate carries quota and admission errors)."""

    reason: str
    message: str
    time: datetime | None


def _secret_hint(message: str) -> str:
    """The kubelet names a missing Secret or key (`secret "s3" not found`, `couldn't find key K in Secret
    ns/s3`); say which spec field points at it."""
    if "secret" not in message.lower():
        return message
    return (
        f"{message} (the Secret named by spec.output.credentialsSecret or"
        " spec.tracking.mlflow.credentialsSecret must exist in the SFTJob's namespace with the keys it names)"
    )


def pod_stuck_cause(pod: PodObs) -> tuple[str, str]:
    if pod.unschedulable_message is not None:
        return "Unschedulable", pod.unschedulable_message
    for w in pod.waiting:
        if w.reason in IMAGE_PULL_REASONS:
            return w.reason, w.message or f"cannot pull the trainer image ({w.reason})"
        if w.reason in CONFIG_REASONS:
            return w.reason, _secret_hint(w.message or w.reason)
    for w in pod.waiting:
        if w.reason:
            return w.reason, w.message or w.reason
    if not pod.scheduled:
        return "NotScheduled", "pod not scheduled yet"
    return "PodPending", "pod is Pending (containers not started)"


def detect_stuck(
    pods: list[PodObs],
    job_created: datetime | None,
    job_active: int,
    job_suspended: bool,
    job_events: list[JobEvent],
    now: datetime,
    timeout_seconds: float,
) -> Stuck | None:
    """The first cause found: a pod Pending too long, or no pod at all because creation keeps failing."""
    if job_suspended:
        return None
    pending = sorted(
        (p for p in pods if p.phase == "Pending" and not p.deleting and p.created is not None),
        key=lambda p: (p.created, p.name),
    )
    for pod in pending:
        assert pod.created is not None
        waited = (now - pod.created).total_seconds()
        if waited >= timeout_seconds:
            reason, message = pod_stuck_cause(pod)
            return Stuck(
                reason, f"pod {pod.name} Pending for {int(waited)}s: {message}", pod.created, pod.name
            )
    live = [p for p in pods if not p.deleting and p.phase in ("Pending", "Running")]
    if not live and job_active == 0 and job_created is not None:
        waited = (now - job_created).total_seconds()
        failed_create = [e for e in job_events if e.reason == "FailedCreate"]
        if failed_create and waited >= timeout_seconds:
            last = failed_create[-1]
            reason = "QuotaExceeded" if "quota" in last.message.lower() else "FailedCreate"
            return Stuck(reason, f"Job cannot create pods for {int(waited)}s: {last.message}", job_created)
    return None


def stuck_failure_message(
    stuck: Stuck, now: datetime, timeout_seconds: float, fail_after: float | None
) -> str | None:
    """Failed/Stuck once Stuck has lasted runPolicy.failWhenStuckSeconds beyond the Stuck threshold."""
    if fail_after is None:
        return None
    waited = (now - stuck.since).total_seconds()
    if waited >= timeout_seconds + fail_after:
        return (
            f"stuck for {int(waited)}s (stuckPendingTimeoutSeconds + failWhenStuckSeconds): {stuck.message}"
        )
    return None
