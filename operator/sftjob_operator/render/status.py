"""The SFTJob status the reconcile writes (typed: `SFTJobStatus`), and the eval outcome it is built from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from sftjob_api import STAGE_TABLE, Layout, Reason, SFTJobSpec, SFTJobStatus, Stage
from sftjob_api.exit_codes import PERMANENT_CODES, ExitCode
from sftjob_api.layout import status_artifacts
from sftjob_api.status import Children, EvalResults, Progress
from sftjob_api.tracking import TrackingStatus, parse_tracking

from . import phase as ph
from .conditions import derive_conditions, get_condition, set_condition
from .names import ChildNames
from .objects import needs_service
from .observe import JobObs, PodObs, parse_eval_results, parse_time
from .progress import training_done
from .rank_ends import first_failed
from .stuck import Stuck
from .user_view import shown_progress

Obj = dict[str, Any]


def owned_by(obj: Obj, uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])


def parse_status(raw: Obj | None) -> SFTJobStatus:
    """status as stored; a key that does not validate (written by an older operator) is dropped, not fatal."""
    data = dict(raw or {})
    for _ in range(len(data) + 1):
        try:
            return SFTJobStatus.model_validate(data)
        except ValidationError as e:
            bad = {err["loc"][0] for err in e.errors() if err["loc"]}
            if not bad & data.keys():
                break
            data = {k: v for k, v in data.items() if k not in bad}
    return SFTJobStatus()


def status_patch(stored: Obj | None, new: SFTJobStatus) -> Obj:
    """The top-level status keys of `new` that differ from the stored status (a merge patch). Inside them, a
    key the stored object has and `new` lacks is patched to null: a JSON merge patch keeps any key it does
    not mention, so an unset progress.loss or artifacts.latestCheckpoint would otherwise stay as it was."""
    dumped = new.model_dump(mode="json", exclude_none=True)
    stored = stored or {}
    return {k: _removing_stale(stored.get(k), v) for k, v in dumped.items() if stored.get(k) != v}


def _removing_stale(stored: Any, new: Any) -> Any:
    if not (isinstance(stored, dict) and isinstance(new, dict)):
        return new  # scalars and lists: a merge patch replaces them whole
    out = {k: _removing_stale(stored.get(k), v) for k, v in new.items()}
    return out | {k: None for k in stored.keys() - new.keys()}


@dataclass(frozen=True)
class EvalOutcome:
    """What a finished eval Job says: its results, gate failures (None: not known), a gate exit message."""

    results: EvalResults | None = None
    gate_failures: tuple[str, ...] | None = None
    gate_exit: str | None = None


def eval_outcome(
    spec: SFTJobSpec, eval_job: JobObs | None, pods: list[PodObs], prev: SFTJobStatus
) -> EvalOutcome:
    if eval_job is None or not eval_job.finished:
        return EvalOutcome()
    eval_pods = [p for p in pods if p.stage == Stage.EVAL]
    msg = next(
        (p.termination_message for p in eval_pods if p.phase == "Succeeded" and p.termination_message),
        None,
    )
    # The trainer enforces the gates itself (exit code EVAL_GATE_FAILED); the eval pod also reports its
    # results (JSON termination message): the operator records them and checks the gates the same way.
    results = parse_eval_results(msg) or prev.eval_results
    gates = spec.eval.gates
    gate_failures: tuple[str, ...] | None = None
    if eval_job.complete:
        gate_failures = tuple(gates.failures(results)) if gates is not None and results else ()
    gate_exit: str | None = None
    gate_pod = next((p for p in eval_pods if p.exit_code == ExitCode.EVAL_GATE_FAILED), None)
    if eval_job.failed_reason is not None and gate_pod is not None:
        gate_exit = failed_pod_message(eval_job, [gate_pod], Stage.EVAL) or (
            f"eval exited with code {int(ExitCode.EVAL_GATE_FAILED)}"
        )
    return EvalOutcome(results, gate_failures, gate_exit)


def failed_pod_message(job: JobObs | None, pods: list[PodObs], stage: Stage) -> str | None:
    """Why a failed single-pod stage failed, in its pod's words: the termination message of the stage's newest
    pod that exited non-zero (the trainer writes a permanent error's reason there; Kubernetes falls back to
    the log tail). None while the Job has not failed, or when no pod said anything."""
    if job is None or job.failed_reason is None:
        return None
    failed = [p for p in pods if p.stage == stage and p.exit_code and (p.termination_message or "").strip()]
    if not failed:
        return None
    newest = max(failed, key=lambda p: p.created or datetime.min.replace(tzinfo=UTC))
    return (newest.termination_message or "").strip()


def failed_rank_message(job: JobObs | None, ranks: list[PodObs]) -> str | None:
    """Why a failed group Job failed, in a rank's words: the termination message of the newest rank that
    exited with a permanent code (the podFailurePolicy's FailJob rule), else of the rank that took the group
    down (render/rank_ends.py). None while the Job has not failed, or when that rank said nothing."""
    if job is None or job.failed_reason is None:
        return None
    said = [p for p in ranks if (p.termination_message or "").strip()]
    permanent = [p for p in said if p.exit_code in PERMANENT_CODES]
    pod = (
        max(permanent, key=lambda p: p.created or datetime.min.replace(tzinfo=UTC))
        if permanent
        else first_failed(said)
    )
    return (pod.termination_message or "").strip() if pod is not None else None


def exit_failure(job: JobObs | None, pods: list[PodObs], stage: Stage) -> tuple[Reason, str] | None:
    """Once the stage's Job failed: the Failed reason its row gives the exit code one of its pods ended with
    (sftjob_api.stage_table: exit_reasons), and what that pod said; None when no pod exited so."""
    codes = STAGE_TABLE[stage].exit_reasons
    ended = [p for p in pods if p.stage == stage and p.exit_code in codes]
    if job is None or job.failed_reason is None or not ended:
        return None
    newest = max(ended, key=lambda p: p.created or datetime.min.replace(tzinfo=UTC))
    code = newest.exit_code or 0
    said = failed_pod_message(job, [newest], stage) or f"exit code {code}"
    return STAGE_TABLE[stage].failure_reason(code), said


def tracking_status(pods: list[PodObs], prev: TrackingStatus | None) -> TrackingStatus | None:
    """status.tracking: the MLflow run the stages report in their termination messages (any pod; the
    newest pod's report wins), else what status already holds."""
    newest = sorted(pods, key=lambda p: p.created or datetime.min.replace(tzinfo=UTC), reverse=True)
    found = (parse_tracking(p.termination_message) for p in newest if p.termination_message)
    return next((t for t in found if t is not None), prev)


def build_status(
    meta: Obj,
    prev: SFTJobStatus,
    spec: SFTJobSpec | None,
    decision: ph.Decision,
    obs: ph.Observed,
    eval_results: EvalResults | None,
    stuck: Stuck | None,
    now: datetime,
    generation: int | None,
    names: ChildNames,
) -> SFTJobStatus:
    """Every status field the reconcile owns (progress is the progress reader's: kept from `prev`, dropped
    once the next group stage's Job exists, completed once the group stage's Job has succeeded)."""
    conds = derive_conditions(list(prev.conditions), decision, obs, now, generation)
    if stuck is not None and decision.phase != ph.SUCCEEDED:
        conds = set_condition(conds, "Stuck", "True", stuck.reason, stuck.message, now, generation)
    elif get_condition(conds, "Stuck") is not None:
        conds = set_condition(conds, "Stuck", "False", "Progressing", "no pod is stuck", now, generation)
    status = SFTJobStatus(
        phase=decision.phase,
        reason=decision.reason,
        message=decision.message,
        conditions=conds,
        observed_generation=generation,
        start_time=prev.start_time or parse_time(meta.get("creationTimestamp")) or now,
        restarts=prev.restarts,  # group restarts: counted by render/recovery.py
        recoveries=prev.recoveries,
        progress=shown_progress(group_progress(prev.progress, obs), decision.reason),
        training_start_time=prev.training_start_time,
        completion_time=prev.completion_time,
    )
    if spec is not None and decision.reason != Reason.INVALID_SPEC:
        arts = status_artifacts(spec, meta["namespace"], meta["name"])
        # latestCheckpoint is the progress reader's (from the trainer's metrics): keep it while it is
        # under this spec's checkpoints prefix of the group stage the run is in (train's, then align's).
        latest = prev.artifacts.latest_checkpoint if prev.artifacts else None
        if latest and arts.root and latest.startswith(f"{arts.root}{Layout.STAGE_CHECKPOINTS[obs.group]}/"):
            arts.latest_checkpoint = latest
        status.artifacts = arts
        status.children = Children(
            service=names.service if needs_service(spec) else None,
            train_job=names.train_job,
            align_job=names.job(Stage.ALIGN) if obs.jobs.get(Stage.ALIGN) is not None else None,
            eval_job=names.eval_job if obs.eval is not None else None,
            merge_job=names.merge_job if obs.merge is not None else None,
        )
    if status.training_start_time is None and (
        decision.phase in ph.GROUP_PHASES or (obs.train is not None and obs.train.complete)
    ):
        status.training_start_time = now
    if eval_results is not None:
        status.eval_results = eval_results.model_copy(
            update={"gates_passed": None, "failed_gates": []}
            if obs.gate_failures is None
            else {"gates_passed": not obs.gate_failures, "failed_gates": list(obs.gate_failures)}
        )
    if decision.terminal:
        status.completion_time = prev.completion_time or now
    return status


def group_progress(progress: Progress | None, obs: ph.Observed) -> Progress | None:
    """status.progress is the group stage's the run is in: another stage's (training's, once the align Job
    exists) is dropped, the align group's steps count from 0; once the stage's Job has succeeded every
    planned step is done."""
    job = obs.jobs.get(obs.group)
    if progress is not None and job is not None and (progress.stage or Stage.TRAIN) != obs.group:
        return None
    return training_done(progress) if job is not None and job.complete else progress
