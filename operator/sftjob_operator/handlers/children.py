"""Child objects of one SFTJob: create them (once), suspend leftovers, find the ones stuck Pending."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime

from kubernetes.client.exceptions import ApiException

from sftjob_api import STAGE_TABLE, SFTJobSpec, Stage, stages

from ..render.elastic import spec_at
from ..render.names import ChildNames
from ..render.network_policy import NetworkPolicyOptions, render_network_policy
from ..render.objects import RenderOptions, SFTJobRef, needs_service, render_service, render_stage_job
from ..render.observe import JobObs, PodObs, parse_time
from ..render.stuck import JobEvent, Stuck, detect_stuck
from .kube import Kube
from .state import Memo

log = logging.getLogger("sftjob_operator.reconcile")

FullSpec = Callable[[], SFTJobSpec] | None

# Re-create a child that the index still does not show this long after we created it (deleted by hand).
RECREATE_AFTER_S = 30.0


class Children:
    def __init__(self, kube: Kube, opts: RenderOptions, network: NetworkPolicyOptions | None = None):
        self.kube = kube
        self.opts = opts
        self.network = network

    def ensure_base(
        self,
        ref: SFTJobRef,
        spec: SFTJobSpec,
        jobs: Mapping[Stage, JobObs],
        memo: Memo,
        full: FullSpec = None,
        nodes: int | None = None,
    ) -> None:
        """The NetworkPolicy, the Service of a multi-node run and the first stage's Job (curate, else train)."""
        # Once a stage Job exists its NetworkPolicy and Service were created before it.
        if jobs:
            return
        # The policy first: no pod of this run ever runs without it.
        if self.network is not None and "networkpolicy" not in memo.created:
            self.kube.create(render_network_policy(ref, self.network, self.opts.metrics_port))
            memo.created["networkpolicy"] = time.monotonic()
        self._ensure_service(ref, spec, memo, Stage.TRAIN)
        self.create_job(stages(spec)[0], ref, spec, memo, full, nodes)

    def _ensure_service(self, ref: SFTJobRef, spec: SFTJobSpec, memo: Memo, stage: Stage) -> None:
        """A group stage's headless Service (a multi-node run), before its Job."""
        key = f"service-{stage}"
        if needs_service(spec) and key not in memo.created:
            self.kube.create(render_service(ref, stage))
            memo.created[key] = time.monotonic()

    def create_job(
        self,
        stage: Stage,
        ref: SFTJobRef,
        spec: SFTJobSpec,
        memo: Memo,
        full: FullSpec = None,
        nodes: int | None = None,
    ) -> None:
        """`full` gives the spec with its child-only fields when `spec` came from the slim index; `nodes`: a
        group stage's size (render/elastic.py: stage_size), resources.nodes when None."""
        last = memo.created.get(stage)
        if last is not None and time.monotonic() - last < RECREATE_AFTER_S:
            return  # created moments ago; the watch has not shown it yet
        whole = full() if full else spec
        if STAGE_TABLE[stage].group:
            # resources.nodes may have been edited from 1 (no Service yet) while the run was suspended
            self._ensure_service(ref, whole, memo, stage)
            whole = spec_at(whole, nodes or whole.resources.nodes)
        job = render_stage_job(stage, ref, whole, self.opts)
        if self.kube.create(job):
            log.info("created %s Job %s/%s", stage, ref.namespace, job["metadata"]["name"])
        memo.created[stage] = time.monotonic()

    def stop_unfinished(self, namespace: str, jobs: list[JobObs]) -> None:
        """A finished run keeps nothing running: suspend leftover Jobs (a Failed/Stuck run's Pending pods)."""
        for job in jobs:
            if job.uid and not job.finished and not job.suspended and not job.deleting:
                self.kube.set_job_suspend(namespace, job.name, True)

    def find_stuck(
        self,
        namespace: str,
        jobs: Mapping[Stage, JobObs],
        pods: list[PodObs],
        spec: SFTJobSpec,
        now: datetime,
    ) -> Stuck | None:
        timeout = spec.run_policy.stuck_pending_timeout_seconds
        for stage in Stage:
            job = jobs.get(stage)
            if job is None or job.finished or job.suspended or job.deleting:
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


def refresh_created(
    ref: SFTJobRef, spec: SFTJobSpec, jobs: dict[Stage, JobObs], memo: Memo
) -> dict[Stage, JobObs]:
    """A Job we created whose watch event has not arrived yet counts as existing (fresh, not started)."""
    out = dict(jobs)
    for stage in Stage:
        if (
            stage not in out
            and stage in memo.created
            and time.monotonic() - memo.created[stage] < RECREATE_AFTER_S
        ):
            out[stage] = JobObs(name=ChildNames(ref.name).job(stage), suspended=spec.suspend or ref.queued)
    return out


def own_suspend_writes(jobs: dict[Stage, JobObs], memo: Memo) -> dict[Stage, JobObs]:
    """A child Job's suspend as this process last wrote it, while the watch cache does not show it yet (for at
    most RECREATE_AFTER_S; later, or once shown, what is observed wins). Without it a quick suspend/resume
    lifts nothing (the Job looks running) and a leftover Running pod reads as training (tests/chaos)."""
    out = dict(jobs)
    for stage, job in jobs.items():
        wrote = memo.suspended.get(job.name)
        if wrote is None:
            continue
        value, at = wrote
        if job.suspended == value or time.monotonic() - at >= RECREATE_AFTER_S:
            memo.suspended.pop(job.name, None)
        else:
            out[stage] = replace(job, suspended=value)
    return out
