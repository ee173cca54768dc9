"""The reconcile loop of one SFTJob: observe children -> next_phase -> act -> write status.

Synchronous code run in worker threads (one lock per SFTJob). Every entry point (SFTJob create/update/resume,
child Job events, the periodic timer) calls the same `reconcile`, so the outcome never depends on which
event arrived: it is computed from the freshly read SFTJob and the operator's in-memory index of child
Jobs and Pods (kept current by kopf's watch streams).

The pieces: `state` (what the reconcile works from), `children` (creating and suspending child objects,
stuck detection), `events` (Events and metrics of a transition), `progress` (the progress reader),
`terminal` (after the end: TTL); the status itself is computed by the pure `render.status`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

from kubernetes.client.exceptions import ApiException

from sftjob_api import SFTJobSpec, SFTJobStatus, SpecError, Stage, parse_spec, stages
from sftjob_api.policy import policy_error

from .. import metrics
from ..render import phase as ph
from ..render.bad_nodes import avoided_nodes
from ..render.names import COMPLETION_INDEX_LABEL, LABEL_STAGE, ChildNames
from ..render.objects import SFTJobRef
from ..render.observe import JobObs, PodObs, observe_job, observe_pod
from ..render.recovery import RestartPlan, plan_restart, stall_now, stalled_condition
from ..render.status import (
    EvalOutcome,
    build_status,
    eval_outcome,
    failed_pod_message,
    owned_by,
    parse_status,
    tracking_status,
)
from ..render.stuck import Stuck, stuck_failure_message
from ..render.trainer_config import cluster_output_error
from ..render.user_view import unschedulable_condition
from ..settings import Settings
from .children import Children, FullSpec, own_suspend_writes, refresh_created
from .events import record_transition
from .kube import ChildConflict, ChildNotYet, ChildRejected, Kube
from .kueue import sync_workload_active
from .progress import ProgressTarget, progress_target, progress_update, read_metrics
from .state import CHILD_ONLY_DIGEST, Memo, Obj, Snapshot, slim_job, slim_pod, slim_sftjob
from .terminal import after_terminal

log = logging.getLogger("sftjob_operator.reconcile")


class StaleChildren(Exception):
    """The children in the watch caches decide an earlier phase than the status records (ph.goes_back)."""


def eval_loss(status: SFTJobStatus) -> float | None:
    return status.eval_results.eval_loss if status.eval_results else None


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Reconciler:
    def __init__(self, settings: Settings, kube: Kube):
        self.settings = settings
        self.kube = kube
        self.opts = settings.render_options()
        network = settings.network_policy
        api_ip = kube.api_server_ip() if network is not None else None
        self.children = Children(
            kube, self.opts, network.excluding(api_ip) if network and api_ip else network
        )
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._memos: dict[str, Memo] = {}
        self._progress: dict[tuple[str, str], ProgressTarget] = {}  # reads a tick decided on, not yet done

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def memo(self, uid: str) -> Memo:
        with self._locks_guard:
            return self._memos.setdefault(uid, Memo())

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            self._progress.pop((namespace, name), None)
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
            body = self._newest(seen)
            fresh = False  # snap read from the API (not from the watch caches)
            for attempt in range(4):
                if body is None:
                    body = self.kube.get_sftjob(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return None
                try:
                    return self._reconcile(body, snap, tick, trust_snapshot=fresh)
                except StaleChildren as e:
                    log.info("%s/%s: children seen say %s; reading them from the API", namespace, name, e)
                    jobs, pods = self.kube.list_children(namespace, name)
                    snap = Snapshot(jobs=[slim_job(j) for j in jobs], pods=[slim_pod(p) for p in pods])
                    fresh = True
                except ApiException as e:
                    if e.status == 409 and attempt < 3:
                        body = None  # our view was stale (resourceVersion): read it again
                        continue
                    raise
        return None

    def _newest(self, seen: Obj | None) -> Obj | None:
        """The watch may not show this process's own last status write yet: start from what that write
        returned, not from the copy it replaced (whose resourceVersion would only earn a 409 and a GET)."""
        if seen is None:
            return None
        memo = self.memo(seen["metadata"]["uid"])
        if memo.own_write is not None and memo.own_write[0] == seen["metadata"].get("resourceVersion"):
            return memo.own_write[1]
        memo.own_write = None  # the watch has caught up (or someone else wrote): what it shows wins
        return seen

    def _full_spec(self, body: Obj) -> FullSpec:
        """For a slim `body` (state.slim_sftjob): read the SFTJob's spec with tolerations and affinity, once a
        Job is rendered from it. A spec the API server stored before their caps fails InvalidSpec here."""
        if CHILD_ONLY_DIGEST not in body:
            return None
        meta = body["metadata"]

        def read() -> SFTJobSpec:
            full = self.kube.get_sftjob(meta["namespace"], meta["name"])
            if full is None or full["metadata"].get("uid") != meta["uid"]:
                raise ChildNotYet("the SFTJob is gone")
            try:
                return parse_spec(full.get("spec") or {})
            except SpecError as e:
                raise ChildRejected("; ".join(e.errors)) from None

        return read

    def _node_problems(self, train: JobObs | None, pods: list[PodObs], tick: bool) -> dict[str, str]:
        """NotReady or gone nodes under the train pods (render/bad_nodes.py). Read at the progress interval
        (`tick`) and while a failed or torn-down group is handled; never for a run with no live train pod."""
        if train is None or self.kube.nodes_forbidden:
            return {}
        if not (tick or train.deleting or train.failed_reason):
            return {}
        nodes = {p.node for p in pods if p.node and p.phase in ("Pending", "Running")}
        found = {n: self.kube.node_problem(n) for n in sorted(nodes)}
        return {n: why for n, why in found.items() if why}

    # ---- the body ------------------------------------------------------------------------------------------

    def _reconcile(self, body: Obj, snap: Snapshot, tick: bool, trust_snapshot: bool = False) -> str | None:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = meta.get("generation")
        prev = parse_status(body.get("status"))
        prev_phase = prev.phase
        memo = self.memo(uid)
        now = _now()

        if prev_phase is not None and prev_phase in ph.TERMINAL:
            metrics.PHASES.set(uid, prev_phase, namespace, name, eval_loss=eval_loss(prev))
            after_terminal(self.kube, self.children, body, prev, snap, memo, now)
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
            name=name,
            namespace=namespace,
            uid=uid,
            labels=tuple(sorted((meta.get("labels") or {}).items())),
            avoid_nodes=avoided_nodes(prev.recoveries),
        )
        names = ChildNames(name)
        # A train Job being deleted stays in view: it is a group restart's teardown (render/recovery.py).
        jobs = {
            j["metadata"].get("labels", {}).get(LABEL_STAGE): j
            for j in snap.jobs
            if owned_by(j, uid)
            and (
                not j["metadata"].get("deletionTimestamp")
                or j["metadata"].get("labels", {}).get(LABEL_STAGE) == Stage.TRAIN
            )
        }
        job_uids = {s: j["metadata"].get("uid") for s, j in jobs.items()}
        pods = [p for p in snap.pods if any(owned_by(p, u) for u in job_uids.values() if u)]
        obs_jobs: dict[Stage, JobObs] = {Stage(s): observe_job(j) for s, j in jobs.items() if s in set(Stage)}
        pod_obs = [observe_pod(p, LABEL_STAGE, COMPLETION_INDEX_LABEL) for p in pods]

        if spec is not None and spec_error is None and not jobs:
            # The admin policy again, before the first child: for SFTJobs admitted before it existed
            # (sftjob_api/policy.py). Like admission, it judges what is about to start; a run already going
            # is not failed by a later, tighter policy.
            spec_error = policy_error(body, namespace, self.settings.admission_policy)

        name_conflict: str | None = None
        if spec is not None and spec_error is None:
            try:
                self.children.ensure_base(ref, spec, obs_jobs, memo, self._full_spec(body))
            except ChildRejected as e:  # the spec's fault: Failed/InvalidSpec, never retried
                spec_error = str(e)
            except ChildConflict as e:  # someone else's object has a child's name: Failed/NameConflict
                name_conflict = str(e)
            except ChildNotYet as e:  # an earlier SFTJob's child is still going: the next reconcile creates
                log.info("%s/%s: %s", namespace, name, e)
        if spec is not None and spec_error is None:
            obs_jobs = own_suspend_writes(refresh_created(ref, spec, obs_jobs, memo), memo)

        outcome = eval_outcome(spec, obs_jobs.get(Stage.EVAL), pod_obs, prev) if spec else EvalOutcome()

        stuck: Stuck | None = None
        stuck_fail: str | None = None
        if spec is not None and spec_error is None and not spec.suspend:
            stuck = self.children.find_stuck(namespace, obs_jobs, pod_obs, spec, now)
            if stuck is not None:
                stuck_fail = stuck_failure_message(
                    stuck,
                    now,
                    spec.run_policy.stuck_pending_timeout_seconds,
                    spec.run_policy.fail_when_stuck_seconds,
                )

        running = sum(
            1 for p in pod_obs if p.stage == Stage.TRAIN and p.phase == "Running" and not p.deleting
        )
        stopping = sum(1 for p in pod_obs if p.stage == Stage.TRAIN and p.phase == "Running" and p.deleting)
        restart = RestartPlan(prev)
        train_job = obs_jobs.get(Stage.TRAIN)
        if spec is not None and spec_error is None:
            policy = spec.run_policy
            stall = stall_now(memo.steps, train_job, running, prev_phase, spec.suspend, policy, now)
            train_pods = [p for p in pod_obs if p.stage == Stage.TRAIN]
            problems = self._node_problems(train_job, train_pods, tick)
            restart = plan_restart(prev, spec.run_policy, train_job, train_pods, stall, now, problems)

        obs = ph.Observed(
            phase=prev_phase,
            spec_error=spec_error,
            name_conflict=name_conflict,
            suspend=bool(spec.suspend) if spec else False,
            queued=ref.queued,
            curate=obs_jobs.get(Stage.CURATE),
            train=obs_jobs.get(Stage.TRAIN),
            eval=obs_jobs.get(Stage.EVAL),
            merge=obs_jobs.get(Stage.MERGE),
            stages=stages(spec) if spec else ph.ALL_STAGES,
            gate_failures=outcome.gate_failures,
            running_train_pods=running,
            stopping_train_pods=stopping,
            stuck_failure=stuck_fail,
            eval_gate_exit=outcome.gate_exit,
            curate_failure=failed_pod_message(obs_jobs.get(Stage.CURATE), pod_obs, Stage.CURATE),
            group_restart=restart.group_restart,
            restarts_exhausted=restart.exhausted,
        )
        decision = ph.next_phase(obs)
        if not trust_snapshot and ph.goes_back(prev_phase, decision.phase, ph.curation_done(obs)):
            raise StaleChildren(f"{prev_phase} -> {decision.phase}")  # before acting on the stale view

        # Act: the stage Job the decision needs, and suspend state of the live stage Job.
        if spec is not None and spec_error is None and not decision.terminal:
            stage = ph.active_stage(decision, obs)
            if stage is not None and stage not in obs_jobs:
                try:
                    self.children.create_job(stage, ref, spec, memo, self._full_spec(body))
                except ChildRejected as e:
                    obs = replace(obs, spec_error=str(e))
                    decision = ph.next_phase(obs)
                except ChildConflict as e:
                    obs = replace(obs, name_conflict=str(e))
                    decision = ph.next_phase(obs)
                except ChildNotYet as e:
                    log.info("%s/%s: %s", namespace, name, e)
                else:
                    # Decide again with the new Job in view, as the next reconcile would: one status write
                    # per transition instead of two (benchmarks/operator_scale.py counts them).
                    obs_jobs = refresh_created(ref, spec, obs_jobs, memo)
                    outcome = eval_outcome(spec, obs_jobs.get(Stage.EVAL), pod_obs, prev)
                    obs = replace(
                        obs,
                        curate=obs_jobs.get(Stage.CURATE),
                        train=obs_jobs.get(Stage.TRAIN),
                        eval=obs_jobs.get(Stage.EVAL),
                        merge=obs_jobs.get(Stage.MERGE),
                        gate_failures=outcome.gate_failures,
                        eval_gate_exit=outcome.gate_exit,
                    )
                    decision = ph.next_phase(obs)
            for job in obs_jobs.values():
                if job.finished or job.deleting:
                    continue
                if ref.queued and sync_workload_active(self.kube, namespace, job, not spec.suspend, memo):
                    continue  # Kueue suspends and resumes its Job (handlers/kueue.py)
                if spec.suspend and not job.suspended:
                    self.kube.set_job_suspend(namespace, job.name, True)
                    memo.suspended[job.name] = (True, time.monotonic())
                elif not spec.suspend and job.suspended and not ref.queued:
                    self.kube.set_job_suspend(namespace, job.name, False)
                    memo.suspended[job.name] = (False, time.monotonic())

        if decision.terminal:
            self.children.stop_unfinished(namespace, list(obs_jobs.values()))

        status = build_status(
            meta, restart.status, spec, decision, obs, outcome.results, stuck, now, generation, names
        )
        status.conditions = stalled_condition(status.conditions, restart, now, generation)
        status.conditions = unschedulable_condition(status.conditions, pod_obs, now, generation)
        status.tracking = tracking_status(pod_obs, prev.tracking)
        written = self.kube.write_status(body, status)
        if written is not body:
            memo.own_write = (meta["resourceVersion"], slim_sftjob(written))
        if restart.delete is not None:  # after the recovery is recorded: a retry never counts it twice
            self.kube.delete_job(namespace, restart.delete.name, restart.delete.uid)
            memo.created.pop(Stage.TRAIN, None)  # re-create as soon as it is gone
        for pod in restart.force_delete:  # on a NotReady/gone node: no kubelet ends them
            self.kube.force_delete_pod(namespace, pod.name)
        metrics.PHASES.set(uid, decision.phase, namespace, name, stuck is not None, eval_loss(status))
        record_transition(self.kube, body, prev, status, decision, stuck, now)
        if tick and decision.phase == ph.TRAINING and spec is not None:
            train_uid = train_job.uid if train_job else ""
            port, interval = self.settings.trainer_metrics_port, self.settings.progress_interval
            target = progress_target(pod_obs, port, interval, memo, train_uid, written, spec)
            if target is not None:  # read by `progress`, after this lock is released
                with self._locks_guard:
                    self._progress[(namespace, name)] = target
        return decision.phase

    # ---- the progress reader (handlers/progress.py) --------------------------------------------------------

    def progress(self, namespace: str, name: str) -> None:
        """Read the trainer's /metrics that the last tick chose, holding no lock while the (tenant-controlled)
        trainer answers; then write what changed under the SFTJob's lock, from the newest SFTJob this process
        knows (one re-read if that proves stale)."""
        with self._locks_guard:
            target = self._progress.pop((namespace, name), None)
        if target is None:
            return
        page = read_metrics(target, self.settings.progress_timeout)
        if page is None:
            return
        uid = target.body["metadata"]["uid"]
        with self.lock(namespace, name):
            memo = self.memo(uid)
            body: Obj | None = memo.own_write[1] if memo.own_write else target.body
            for attempt in range(2):
                if body is None or body["metadata"].get("uid") != uid:
                    return
                status = parse_status(body.get("status"))
                if status.phase != ph.TRAINING:
                    return  # the run moved on while the trainer answered
                update = progress_update(target, body["metadata"], status, page, memo)
                if not update:
                    return
                try:
                    written = self.kube.write_status(body, status.model_copy(update=update))
                except ApiException as e:
                    if e.status != 409 or attempt:
                        raise
                    body = self.kube.get_sftjob(namespace, name)
                    continue
                memo.last_progress_write = time.monotonic()
                if written is not body:
                    memo.own_write = (body["metadata"]["resourceVersion"], slim_sftjob(written))
                return
