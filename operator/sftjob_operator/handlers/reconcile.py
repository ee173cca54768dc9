"""The reconcile loop of one SFTJob: read -> observe -> decide -> act -> write status.

Synchronous code run in worker threads (one lock per SFTJob). Every entry point (SFTJob create/update/resume,
child Job events, the periodic timer) calls the same `reconcile`, so the outcome never depends on which
event arrived: it is computed from the freshly read SFTJob and the operator's in-memory index of child
Jobs and Pods (kept current by kopf's watch streams).

The pieces: `state` (what the reconcile works from), `children` (creating and suspending child objects,
stuck detection), `events` (Events and metrics of a transition), `progress` (the progress reader),
`terminal` (after the end: TTL); the view, the decision and the status itself are pure
(`render.observation`, `render.phase`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from kubernetes.client.exceptions import ApiException

from sftjob_api import STAGE_TABLE, SFTJobSpec, SFTJobStatus, SpecError, Stage, parse_spec, stages
from sftjob_api.policy import policy_error

from .. import metrics
from ..render import phase as ph
from ..render.admission import Admitted
from ..render.bad_nodes import avoided_nodes
from ..render.elastic import capacity_mark, group_size, render_probe_job, spec_at, stage_size
from ..render.names import GROUP_SIZE_GATE, LABEL_NODES, NNODES_ANNOTATION, PROBE
from ..render.objects import SFTJobRef, render_stage_job
from ..render.observation import (
    Observation,
    children_of,
    observe,
    read_spec,
    render_status,
    running_pods,
    stage_pods,
)
from ..render.observe import JobObs, PodObs
from ..render.recovery import Stall, stall_now
from ..render.status import parse_status
from ..render.stuck import Stuck
from ..settings import Settings
from .children import RECREATE_AFTER_S, Children, FullSpec, own_suspend_writes, refresh_created
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

    def _node_problems(self, job: JobObs | None, pods: list[PodObs], tick: bool) -> dict[str, str]:
        """NotReady or gone nodes under the group's pods (render/bad_nodes.py). Read at the progress interval
        (`tick`) and while a failed or torn-down group is handled; never for a run with no live group pod."""
        if job is None or self.kube.nodes_forbidden:
            return {}
        if not (tick or job.deleting or job.failed_reason):
            return {}
        nodes = {p.node for p in pods if p.node and p.phase in ("Pending", "Running")}
        found = {n: self.kube.node_problem(n) for n in sorted(nodes)}
        return {n: why for n, why in found.items() if why}

    # ---- the body ------------------------------------------------------------------------------------------

    def _reconcile(self, body: Obj, snap: Snapshot, tick: bool, trust_snapshot: bool = False) -> str | None:
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        prev = parse_status(body.get("status"))
        memo = self.memo(uid)
        now = _now()

        if prev.phase is not None and prev.phase in ph.TERMINAL:
            metrics.PHASES.set(uid, prev.phase, namespace, name, eval_loss=eval_loss(prev))
            after_terminal(self.kube, self.children, body, prev, snap, memo, now)
            return str(prev.phase)

        # Read: the spec and the children this SFTJob owns.
        spec, spec_error = read_spec(body.get("spec"))
        ref = SFTJobRef(
            name=name,
            namespace=namespace,
            uid=uid,
            labels=tuple(sorted((meta.get("labels") or {}).items())),
            avoid_nodes=avoided_nodes(prev.recoveries),
        )
        kids = children_of(uid, snap.jobs, snap.pods)
        jobs, name_conflict = kids.jobs, None
        if spec is not None and spec_error is None and not jobs:
            # The admin policy again, before the first child: for SFTJobs admitted before it existed
            # (sftjob_api/policy.py). Like admission, it judges what is about to start; a run already going
            # is not failed by a later, tighter policy.
            spec_error = policy_error(body, namespace, self.settings.admission_policy)
        if spec is not None and spec_error is None:
            size = group_size(spec, prev)
            spec_error, name_conflict = self._ensure_base(ref, spec, jobs, memo, body, size)
        if spec is not None and spec_error is None:
            jobs = own_suspend_writes(refresh_created(ref, spec, dict(jobs), memo), memo)

        # Observe: the children, plus what they do not say (Job events of stuck pods, the step clock, Nodes).
        stuck: Stuck | None = None
        stall: Stall | None = None
        problems: dict[str, str] = {}
        pods = list(kids.pods)
        if spec is not None and spec_error is None and name_conflict is None:
            if not spec.suspend:
                stuck = self.children.find_stuck(namespace, jobs, pods, spec, now)
            group = ph.group_stage(jobs, stages(spec))  # the group of ranks the run is in (train, align)
            job = jobs.get(group)
            running, _ = running_pods(pods, group)
            stall = stall_now(memo.steps, job, running, prev.phase, spec.suspend, spec.run_policy, now, group)
            problems = self._node_problems(job, stage_pods(pods, group), tick)
        memo.capacity_since_step = capacity_mark(memo.capacity_since_step, kids.probe_pods, prev)
        obs = observe(
            prev,
            spec,
            spec_error,
            name_conflict,
            ref.queued,
            jobs,
            pods,
            stuck,
            stall,
            problems,
            now,
            kids.probe_pods,
            memo.capacity_since_step,
        )
        # Act before deciding on one thing: the stage Job the run lacks, so that the decision (and the one
        # status write of this transition) already sees it (benchmarks/operator_scale.py counts the writes).
        if obs.runnable and spec is not None:
            obs = self._create_missing(obs, ref, spec, memo, body)

        # Decide.
        decision = ph.next_phase(obs.phase)
        if not trust_snapshot and ph.goes_back(prev.phase, decision.phase, ph.curation_done(obs.phase)):
            raise StaleChildren(f"{prev.phase} -> {decision.phase}")  # before acting on the stale view

        # Act: suspend state of the live stage Jobs; a finished run keeps nothing running.
        if obs.runnable and spec is not None and not decision.terminal:
            self._sync_suspend(ref, spec, obs, memo)
        if decision.terminal:
            self.children.stop_unfinished(namespace, list(obs.jobs.values()))
        self._sync_probe(ref, obs, kids.probe, 0 if decision.terminal else obs.probe_pods, memo, body)
        if obs.admitted is not None and not decision.terminal:
            self._size_admitted(namespace, obs.jobs[Stage.TRAIN], obs.admitted, body, memo)

        # Write the status, then what must follow it.
        status = render_status(meta, obs, decision, now, meta.get("generation"))
        written = self.kube.write_status(body, status)
        if written is not body:
            memo.own_write = (meta["resourceVersion"], slim_sftjob(written))
        restart = obs.restart
        if restart.delete is not None:  # after the recovery is recorded: a retry never counts it twice
            self.kube.delete_job(namespace, restart.delete.name, restart.delete.uid)
            memo.created.pop(obs.phase.group, None)  # re-create as soon as it is gone
        for pod in restart.force_delete:  # on a NotReady/gone node: no kubelet ends them
            self.kube.force_delete_pod(namespace, pod.name)
        metrics.PHASES.set(uid, decision.phase, namespace, name, stuck is not None, eval_loss(status))
        record_transition(self.kube, body, prev, status, decision, stuck, now)
        if obs.grow_held and not memo.grow_held:  # once per wait (render/elastic.py)
            self.kube.post_event(body, "Normal", "ResizeHeld", obs.grow_held)
        memo.grow_held = obs.grow_held is not None
        group = obs.phase.group
        if tick and decision.phase == STAGE_TABLE[group].phase and spec is not None:
            group_job = obs.jobs.get(group)
            port, interval = self.settings.trainer_metrics_port, self.settings.progress_interval
            target = progress_target(
                pods, port, interval, memo, group_job.uid if group_job else "", written, spec, group
            )
            if target is not None:  # read by `progress`, after this lock is released
                with self._locks_guard:
                    self._progress[(namespace, name)] = target
        return decision.phase

    def _ensure_base(
        self, ref: SFTJobRef, spec: SFTJobSpec, jobs: Mapping[Stage, JobObs], memo: Memo, body: Obj, size: int
    ) -> tuple[str | None, str | None]:
        """The first children of a run (render/objects.py); -> (spec error, name conflict)."""
        try:
            self.children.ensure_base(ref, spec, dict(jobs), memo, self._full_spec(body), size)
        except ChildRejected as e:  # the spec's fault: Failed/InvalidSpec, never retried
            return str(e), None
        except ChildConflict as e:  # someone else's object has a child's name: Failed/NameConflict
            return None, str(e)
        except ChildNotYet as e:  # an earlier SFTJob's child is still going: the next reconcile creates
            log.info("%s/%s: %s", ref.namespace, ref.name, e)
        return None, None

    def _create_missing(
        self, obs: Observation, ref: SFTJobRef, spec: SFTJobSpec, memo: Memo, body: Obj
    ) -> Observation:
        """Create the stage Job the observation lacks; -> the observation with it (or with why it failed)."""
        stage = ph.stage_to_create(obs.phase)
        if stage is None:
            return obs
        size = stage_size(spec, obs.restart.status, stage)
        try:
            self.children.create_job(stage, ref, spec, memo, self._full_spec(body), size)
        except ChildRejected as e:
            return obs.failing(spec_error=str(e))
        except ChildConflict as e:
            return obs.failing(name_conflict=str(e))
        except ChildNotYet as e:
            log.info("%s/%s: %s", ref.namespace, ref.name, e)
            return obs
        return obs.with_jobs(refresh_created(ref, spec, dict(obs.jobs), memo))

    def _sync_probe(
        self, ref: SFTJobRef, obs: Observation, probe: JobObs | None, want: int, memo: Memo, body: Obj
    ) -> None:
        """An elastic run's capacity probe (render/elastic.py): `want` placeholder pods, or none."""
        if probe is not None and probe.completions != want:
            self.kube.delete_job(ref.namespace, probe.name, probe.uid)  # re-created at the new count
            memo.created.pop(PROBE, None)
            return
        if probe is not None or want == 0 or obs.spec is None:
            return
        last = memo.created.get(PROBE)
        if last is not None and time.monotonic() - last < RECREATE_AFTER_S:
            return  # created moments ago; the watch has not shown it yet
        full = self._full_spec(body)
        try:
            spec = full() if full else obs.spec
        except (ChildNotYet, ChildRejected) as e:  # the next reconcile decides on it
            log.info("%s/%s: capacity probe: %s", ref.namespace, ref.name, e)
            return
        train = render_stage_job(
            Stage.TRAIN, ref, spec_at(spec, group_size(spec, obs.restart.status)), self.opts
        )
        self.kube.create(render_probe_job(train, ref.name, want))
        memo.created[PROBE] = time.monotonic()

    def _size_admitted(self, namespace: str, job: JobObs, admitted: Admitted, body: Obj, memo: Memo) -> None:
        """A train Job Kueue admitted (render/admission.py): its size label first (a retry after a crash
        finds it set and only opens the pods left), then each gated pod gets the size and its gate removed."""
        if admitted.relabel and memo.sized != (job.uid, admitted.nodes):
            self.kube.set_job_label(namespace, job.name, LABEL_NODES, str(admitted.nodes))
            self.kube.post_event(body, "Normal", "GroupAdmitted", admitted.message)
            memo.sized = (job.uid, admitted.nodes)
        for pod in admitted.open:
            self.kube.open_pod_gate(namespace, pod, GROUP_SIZE_GATE, {NNODES_ANNOTATION: str(admitted.nodes)})

    def _sync_suspend(self, ref: SFTJobRef, spec: SFTJobSpec, obs: Observation, memo: Memo) -> None:
        """spec.suspend onto every live stage Job (Kueue's Jobs through their Workload)."""
        for job in obs.jobs.values():
            if job.finished or job.deleting:
                continue
            if ref.queued and sync_workload_active(self.kube, ref.namespace, job, not spec.suspend, memo):
                continue  # Kueue suspends and resumes its Job (handlers/kueue.py)
            if spec.suspend and not job.suspended:
                self.kube.set_job_suspend(ref.namespace, job.name, True)
                memo.suspended[job.name] = (True, time.monotonic())
            elif not spec.suspend and job.suspended and not ref.queued:
                self.kube.set_job_suspend(ref.namespace, job.name, False)
                memo.suspended[job.name] = (False, time.monotonic())

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
                if status.phase != STAGE_TABLE[target.stage].phase:
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
