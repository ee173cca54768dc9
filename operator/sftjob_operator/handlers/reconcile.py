"""The reconcile loop of one SFTJob: observe children -> next_phase -> act -> write status.

Synchronous code run in worker threads (one lock per SFTJob). Every entry point (SFTJob create/update/resume,
child Job events, the periodic timer) calls the same `reconcile`, so the outcome never depends on which
event arrived: it is computed from the freshly read SFTJob and the operator's in-memory index of child
Jobs and Pods (kept current by kopf's watch streams).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from .. import metrics
from ..api import SFTJobSpec, SpecError, parse_spec
from ..render import phase as ph
from ..render.artifacts import artifacts, cluster_output_error, merge_enabled
from ..render.conditions import derive_conditions, get_condition, iso, set_condition
from ..render.names import (
    COMPLETION_INDEX_LABEL,
    LABEL_STAGE,
    STAGE_EVAL,
    STAGE_MERGE,
    STAGE_TRAIN,
    STAGES,
    ChildNames,
)
from ..render.objects import SFTJobRef, render_config_map, render_service, render_stage_job
from ..render.observe import JobObs, PodObs, observe_job, observe_pod, parse_eval_results, parse_time
from ..render.progress import parse_progress, progress_changed
from ..render.stuck import JobEvent, Stuck, detect_stuck, stuck_failure_message
from ..settings import Settings
from .kube import Kube

log = logging.getLogger("sftjob_operator.reconcile")
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
# Re-create a child that the index still does not show this long after we created it (deleted by hand).
RECREATE_AFTER_S = 30.0


def permanent_exit_codes() -> tuple[int, ...]:
    try:
        from sftjob_trainer import exit_codes

        return tuple(sorted(exit_codes.PERMANENT_CODES))
    except ImportError:  # the trainer package is not installed next to the operator
        return (2, 3)


def eval_gate_exit_code() -> int:
    try:
        from sftjob_trainer import exit_codes

        return int(exit_codes.EVAL_GATE_FAILED)
    except (ImportError, AttributeError):
        return 3


@dataclass
class Snapshot:
    """Child Jobs and Pods of one SFTJob, copied out of kopf's indexes on the event loop."""

    jobs: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)


def slim_job(body: Any) -> Obj:
    """What the index keeps of a child Job (small: 200+ SFTJobs fit in little memory)."""
    meta = body.get("metadata", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [dict(o) for o in meta.get("ownerReferences") or []],
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {
            "suspend": body.get("spec", {}).get("suspend"),
            "completions": body.get("spec", {}).get("completions"),
        },
        "status": json.loads(json.dumps(dict(body.get("status") or {}))),
    }


def slim_sftjob(body: Any) -> Obj:
    """The SFTJob as last seen by the watch: reconciles start from it instead of a GET (a stale copy is caught
    by the resourceVersion precondition of the status patch, and then re-read)."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: json.loads(json.dumps(meta.get(k)))
            for k in (
                "name",
                "namespace",
                "uid",
                "generation",
                "resourceVersion",
                "labels",
                "creationTimestamp",
                "deletionTimestamp",
            )
            if meta.get(k) is not None
        },
        "spec": json.loads(json.dumps(dict(body.get("spec") or {}))),
        "status": json.loads(json.dumps(dict(body.get("status") or {}))),
    }


def slim_pod(body: Any) -> Obj:
    meta = body.get("metadata", {})
    status = body.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {
                k: v for k, v in (meta.get("annotations") or {}).items() if k == COMPLETION_INDEX_LABEL
            },
            "ownerReferences": [dict(o) for o in meta.get("ownerReferences") or []],
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "conditions": [
                dict(c) for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"
            ],
            "containerStatuses": json.loads(json.dumps(list(status.get("containerStatuses") or []))),
        },
    }


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj.get("metadata", {}).get("ownerReferences") or [])


def _eval_loss(status: Obj) -> float | None:
    value = (status.get("evalResults") or {}).get("evalLoss")
    return float(value) if isinstance(value, int | float) else None


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class _Memo:
    """Per-SFTJob memory of this process (lost on restart, rebuilt from the cluster)."""

    created: dict[str, float] = field(default_factory=dict)  # child key -> monotonic time of create
    last_progress_write: float = 0.0
    ttl_done: bool = False


class Reconciler:
    def __init__(self, settings: Settings, kube: Kube):
        self.settings = settings
        self.kube = kube
        self.opts = settings.render_options()
        self.permanent_codes = permanent_exit_codes()
        self.gate_exit_code = eval_gate_exit_code()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._memos: dict[str, _Memo] = {}

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def memo(self, uid: str) -> _Memo:
        with self._locks_guard:
            return self._memos.setdefault(uid, _Memo())

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            if uid:
                self._memos.pop(uid, None)
        if uid:
            metrics.PHASES.set(uid, None)

    # ---- entry point ---------------------------------------------------------------------------------------

    def reconcile(
        self, namespace: str, name: str, snap: Snapshot, tick: bool = False, seen: Obj | None = None
    ) -> str | None:
        """Bring one SFTJob one step closer to its goal; returns the phase written (None: object gone).

        `seen` is the SFTJob as the watch last delivered it; without it (or when it proves stale) it is read.
        """
        with self.lock(namespace, name):
            body = seen
            for attempt in range(4):
                if body is None:
                    body = self.kube.get_sftjob(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return None
                try:
                    return self._reconcile(body, snap, tick)
                except ApiException as e:
                    if e.status == 409 and attempt < 3:
                        body = None  # our view was stale (resourceVersion): read it again
                        continue
                    raise
        return None

    # ---- the body ------------------------------------------------------------------------------------------

    def _reconcile(self, body: Obj, snap: Snapshot, tick: bool) -> str | None:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = meta.get("generation")
        prev: Obj = dict(body.get("status") or {})
        prev_phase = prev.get("phase")
        memo = self.memo(uid)
        now = _now()

        if prev_phase in ph.TERMINAL:
            metrics.PHASES.set(uid, prev_phase, namespace, name, eval_loss=_eval_loss(prev))
            self._after_terminal(body, prev, snap, memo, now)
            return str(prev_phase)

        spec: SFTJobSpec | None = None
        spec_error: str | None = None
        try:
            spec = parse_spec(body.get("spec") or {})
            spec_error = cluster_output_error(spec)
        except SpecError as e:
            spec_error = "; ".join(e.errors)
        except Exception as e:  # the operator must never crash on user input
            spec_error = f"spec could not be read: {e}"

        ref = SFTJobRef(
            name=name, namespace=namespace, uid=uid, labels=tuple(sorted((meta.get("labels") or {}).items()))
        )
        names = ChildNames(name)
        jobs = {
            j["metadata"].get("labels", {}).get(LABEL_STAGE): j
            for j in snap.jobs
            if _owned_by(j, uid) and not j["metadata"].get("deletionTimestamp")
        }
        job_uids = {s: j["metadata"].get("uid") for s, j in jobs.items()}
        pods = [p for p in snap.pods if any(_owned_by(p, u) for u in job_uids.values() if u)]
        obs_jobs: dict[str, JobObs] = {s: observe_job(j) for s, j in jobs.items() if s in STAGES}
        pod_obs = [observe_pod(p, LABEL_STAGE, COMPLETION_INDEX_LABEL) for p in pods]

        if spec is not None and spec_error is None:
            self._ensure_base_children(ref, spec, obs_jobs, memo)
            obs_jobs = self._refresh_created(ref, spec, obs_jobs, memo)

        eval_results = None
        gate_failures: tuple[str, ...] | None = None
        gate_exit: str | None = None
        eval_job = obs_jobs.get(STAGE_EVAL)
        if spec is not None and eval_job is not None and eval_job.finished:
            eval_pods = [p for p in pod_obs if p.stage == STAGE_EVAL]
            msg = next(
                (
                    p.termination_message
                    for p in eval_pods
                    if p.phase == "Succeeded" and p.termination_message
                ),
                None,
            )
            # The trainer enforces the gates itself (exit code EVAL_GATE_FAILED); when the eval pod also
            # reports its results (JSON termination message) the operator records them and re-checks.
            eval_results = parse_eval_results(msg) or (prev.get("evalResults") or None)
            gates = spec.eval.gates
            if eval_job.complete:
                gate_failures = (
                    ph.evaluate_gates(
                        eval_results,
                        gates.max_eval_loss,
                        gates.max_perplexity,
                        gates.min_rouge_l,
                        gates.min_exact_match,
                    )
                    if gates is not None and eval_results
                    else ()
                )
            gate_pod = next((p for p in eval_pods if p.exit_code == self.gate_exit_code), None)
            if eval_job.failed_reason is not None and gate_pod is not None:
                gate_exit = (
                    gate_pod.termination_message or ""
                ).strip() or f"eval exited with code {self.gate_exit_code}"

        stuck: Stuck | None = None
        stuck_fail: str | None = None
        if spec is not None and spec_error is None and not spec.suspend:
            stuck = self._stuck(namespace, names, obs_jobs, pod_obs, spec, now)
            if stuck is not None:
                stuck_fail = stuck_failure_message(
                    stuck,
                    now,
                    spec.run_policy.stuck_pending_timeout_seconds,
                    spec.run_policy.fail_when_stuck_seconds,
                )

        obs = ph.Observed(
            phase=prev_phase,
            spec_error=spec_error,
            suspend=bool(spec.suspend) if spec else False,
            queued=ref.queued,
            train=obs_jobs.get(STAGE_TRAIN),
            eval=obs_jobs.get(STAGE_EVAL),
            merge=obs_jobs.get(STAGE_MERGE),
            eval_enabled=bool(spec.eval.enabled) if spec else True,
            merge_enabled=merge_enabled(spec) if spec else True,
            gate_failures=gate_failures,
            running_train_pods=sum(
                1 for p in pod_obs if p.stage == STAGE_TRAIN and p.phase == "Running" and not p.deleting
            ),
            stuck_failure=stuck_fail,
            eval_gate_exit=gate_exit,
        )
        decision = ph.next_phase(obs)

        # Act: the stage Job the decision needs, and suspend state of the live stage Job.
        if spec is not None and spec_error is None and decision.phase not in ph.TERMINAL:
            stage = ph.active_stage(decision, obs)
            if stage is not None and stage not in obs_jobs:
                self._create_job(stage, ref, spec, memo)
            for job in obs_jobs.values():
                if job.finished:
                    continue
                if spec.suspend and not job.suspended:
                    self.kube.set_job_suspend(namespace, job.name, True)
                elif not spec.suspend and job.suspended and not ref.queued:
                    self.kube.set_job_suspend(namespace, job.name, False)

        if decision.phase in ph.TERMINAL:
            self._stop_unfinished(namespace, list(obs_jobs.values()))

        status = self._status(body, prev, spec, decision, obs, eval_results, stuck, now, generation, names)
        changed = {k: v for k, v in status.items() if prev.get(k) != v}
        if changed:
            self.kube.patch_sftjob_status(namespace, name, changed, meta.get("resourceVersion"))
        metrics.PHASES.set(uid, decision.phase, namespace, name, stuck is not None, _eval_loss(status))
        self._record_transition(body, prev, status, decision, obs, stuck, now)
        if tick and decision.phase == ph.TRAINING and spec is not None:
            self._progress(body, prev, pod_obs, memo, now)
        return decision.phase

    # ---- pieces ---------------------------------------------------------------------------------------------

    def _stop_unfinished(self, namespace: str, jobs: list[JobObs]) -> None:
        """A finished run keeps nothing running: suspend leftover Jobs (a Failed/Stuck run's Pending pods)."""
        for job in jobs:
            if job.uid and not job.finished and not job.suspended:
                self.kube.set_job_suspend(namespace, job.name, True)

    # ---- children and status --------------------------------------------------------------------------------

    def _ensure_base_children(
        self, ref: SFTJobRef, spec: SFTJobSpec, jobs: dict[str, JobObs], memo: _Memo
    ) -> None:
        # Once the train Job exists its ConfigMap and Service were created before it.
        if STAGE_TRAIN in jobs:
            return
        for key, obj in (("configmap", render_config_map(ref, spec)), ("service", render_service(ref))):
            if key in memo.created:
                continue
            self.kube.create(obj)
            memo.created[key] = time.monotonic()
        self._create_job(STAGE_TRAIN, ref, spec, memo)

    def _create_job(self, stage: str, ref: SFTJobRef, spec: SFTJobSpec, memo: _Memo) -> None:
        last = memo.created.get(stage)
        if last is not None and time.monotonic() - last < RECREATE_AFTER_S:
            return  # created moments ago; the watch has not shown it yet
        job = render_stage_job(stage, ref, spec, self.opts, self.permanent_codes)
        if self.kube.create(job):
            log.info("created %s Job %s/%s", stage, ref.namespace, job["metadata"]["name"])
        memo.created[stage] = time.monotonic()

    def _refresh_created(
        self, ref: SFTJobRef, spec: SFTJobSpec, jobs: dict[str, JobObs], memo: _Memo
    ) -> dict[str, JobObs]:
        """A Job we created whose watch event has not arrived yet counts as existing (fresh, not started)."""
        out = dict(jobs)
        for stage in STAGES:
            if (
                stage not in out
                and stage in memo.created
                and time.monotonic() - memo.created[stage] < RECREATE_AFTER_S
            ):
                out[stage] = JobObs(
                    name=ChildNames(ref.name).job(stage), suspended=spec.suspend or ref.queued
                )
        return out

    def _stuck(
        self,
        namespace: str,
        names: ChildNames,
        jobs: dict[str, JobObs],
        pods: list[PodObs],
        spec: SFTJobSpec,
        now: datetime,
    ) -> Stuck | None:
        timeout = spec.run_policy.stuck_pending_timeout_seconds
        for stage in STAGES:
            job = jobs.get(stage)
            if job is None or job.finished or job.suspended:
                continue
            stage_pods = [p for p in pods if p.stage == stage]
            events: list[JobEvent] = []
            live = [p for p in stage_pods if not p.deleting and p.phase in ("Pending", "Running")]
            created = job.start_time
            if (
                not live
                and job.active == 0
                and created is not None
                and (now - created).total_seconds() >= timeout
            ):
                try:
                    events = [
                        JobEvent(
                            str(e.get("reason") or ""),
                            str(e.get("message") or ""),
                            parse_time(e.get("lastTimestamp") or e.get("eventTime")),
                        )
                        for e in self.kube.job_warning_events(namespace, job.name)
                    ]
                except ApiException as e:
                    log.warning("listing events of Job %s/%s: %s", namespace, job.name, e.reason)
            found = detect_stuck(stage_pods, created, job.active, job.suspended, events, now, timeout)
            if found is not None:
                return found
        return None

    def _status(
        self,
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
            status["artifacts"] = artifacts(spec, meta["namespace"], meta["name"])
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

    def _record_transition(
        self,
        body: Obj,
        prev: Obj,
        status: Obj,
        decision: ph.Decision,
        obs: ph.Observed,
        stuck: Stuck | None,
        now: datetime,
    ) -> None:
        prev_phase = prev.get("phase")
        new_phase = decision.phase
        restarts_before = int(prev.get("restarts") or 0)
        if status["restarts"] > restarts_before:
            metrics.RESTARTS.inc(status["restarts"] - restarts_before)
            self.kube.post_event(
                body,
                "Warning",
                "TrainerRestarted",
                f"trainer failed with a retryable error ({status['restarts']} so far);"
                " the next pod resumes from the newest checkpoint",
            )
        if prev_phase != new_phase or prev.get("reason") != decision.reason:
            if prev_phase != new_phase:
                metrics.TRANSITIONS.labels(from_phase=prev_phase or "", to_phase=new_phase).inc()
            if new_phase == ph.TRAINING and not prev.get("trainingStartTime"):
                created = parse_time(body["metadata"].get("creationTimestamp"))
                if created is not None:
                    metrics.TIME_TO_TRAINING.observe(max((now - created).total_seconds(), 0.0))
            etype = "Warning" if new_phase == ph.FAILED else "Normal"
            if prev_phase != new_phase or new_phase == ph.FAILED:
                self.kube.post_event(
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
        prev_stuck = get_condition(list(prev.get("conditions") or []), "Stuck")
        if stuck is not None and (prev_stuck is None or prev_stuck.get("status") != "True"):
            self.kube.post_event(body, "Warning", f"Stuck{stuck.reason}", stuck.message)

    # ---- progress ------------------------------------------------------------------------------------------

    def _progress(self, body: Obj, prev: Obj, pods: list[PodObs], memo: _Memo, now: datetime) -> None:
        interval = self.settings.progress_interval
        if time.monotonic() - memo.last_progress_write < interval * 0.8:
            return  # rate limit: at most one progress write per interval per SFTJob
        rank0 = next(
            (
                p
                for p in pods
                if p.stage == STAGE_TRAIN
                and p.index == 0
                and p.phase == "Running"
                and p.ip
                and not p.deleting
            ),
            None,
        )
        if rank0 is None:
            return
        url = f"http://{rank0.ip}:{self.settings.trainer_metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=self.settings.progress_timeout) as resp:
                text = resp.read(2_000_000).decode("utf-8", "replace")
        except Exception as e:
            metrics.PROGRESS_READS.labels(result="error").inc()
            log.debug("progress read %s failed: %s", url, e)
            return
        progress = parse_progress(text, now)
        if progress is None:
            metrics.PROGRESS_READS.labels(result="empty").inc()
            return
        metrics.PROGRESS_READS.labels(result="ok").inc()
        if not progress_changed(prev.get("progress"), progress):
            return
        meta = body["metadata"]
        self.kube.patch_sftjob_status(meta["namespace"], meta["name"], {"progress": progress}, None)
        memo.last_progress_write = time.monotonic()

    # ---- after the end -------------------------------------------------------------------------------------

    def _after_terminal(self, body: Obj, prev: Obj, snap: Snapshot, memo: _Memo, now: datetime) -> None:
        meta = body["metadata"]
        generation = meta.get("generation")
        if prev.get("observedGeneration") != generation:
            self.kube.patch_sftjob_status(
                meta["namespace"], meta["name"], {"observedGeneration": generation}, None
            )
        try:
            spec = parse_spec(body.get("spec") or {})
        except Exception:
            return
        owned = [observe_job(j) for j in snap.jobs if _owned_by(j, meta["uid"])]
        self._stop_unfinished(meta["namespace"], owned)
        # The Job controller may count the last failed pod after the Job's Failed condition: keep up.
        train = next((j for j in owned if j.name == ChildNames(meta["name"]).train_job), None)
        if train is not None and train.failed > int(prev.get("restarts") or 0):
            self.kube.patch_sftjob_status(meta["namespace"], meta["name"], {"restarts": train.failed}, None)
        ttl = spec.run_policy.ttl_seconds_after_finished
        done_at = parse_time(prev.get("completionTime"))
        if ttl is None or done_at is None or memo.ttl_done:
            return
        if (now - done_at).total_seconds() < ttl:
            return
        names = ChildNames(meta["name"])
        if spec.run_policy.ttl_policy == "DeleteSFTJob":
            self.kube.post_event(
                body, "Normal", "TTLExpired", f"deleting the SFTJob {ttl}s after it finished"
            )
            self.kube.delete_sftjob(meta["namespace"], meta["name"], meta["uid"])
        elif any(_owned_by(j, meta["uid"]) for j in snap.jobs):
            self.kube.delete_children(
                meta["namespace"], [names.job(s) for s in STAGES], names.config_map, names.service
            )
            self.kube.post_event(
                body,
                "Normal",
                "TTLExpired",
                f"deleted the child Jobs, Service and ConfigMap {ttl}s after it finished;"
                " the SFTJob and its status are kept",
            )
        memo.ttl_done = True
