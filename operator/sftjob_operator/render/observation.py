"""One reconcile's view of an SFTJob, built purely: the spec as read, the children it owns (stage Jobs by
stage, their pods), and everything decided from them before the phase machine runs (the group restart plan,
the eval outcome, a Stuck failure); then the status written from that view and the phase decision.

The reconcile (handlers/reconcile.py) reads, calls `observe`, decides with `phase.next_phase` once, acts,
and writes what `render_status` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sftjob_api import STAGE_TABLE, SFTJobSpec, SFTJobStatus, SpecError, Stage, parse_spec, stages

from . import phase as ph
from .admission import Admitted, plan_admission
from .elastic import plan_resize, probe_size, record_resize, resize_again, stage_size, world
from .names import COMPLETION_INDEX_LABEL, LABEL_STAGE, PROBE, ChildNames
from .observe import JobObs, PodObs, observe_job, observe_pod
from .recovery import RestartPlan, Stall, plan_restart, stalled_condition
from .status import (
    EvalOutcome,
    build_status,
    eval_outcome,
    exit_failure,
    failed_pod_message,
    failed_rank_message,
    owned_by,
    tracking_status,
)
from .stuck import Stuck, stuck_failure_message
from .trainer_config import cluster_output_error
from .user_view import unschedulable_condition

Obj = dict[str, Any]
STAGES = frozenset(Stage)


def read_spec(raw: Obj | None) -> tuple[SFTJobSpec | None, str | None]:
    """The spec, or why it cannot run (field paths); never raises on user input."""
    try:
        spec = parse_spec(raw or {})
        return spec, cluster_output_error(spec)
    except SpecError as e:
        return None, "; ".join(e.errors)
    except Exception as e:  # the operator must never crash on user input
        return None, f"spec could not be read: {e}"


@dataclass(frozen=True)
class Children:
    """The stage Jobs an SFTJob owns (by stage) and their pods; an elastic run's capacity probe apart."""

    jobs: Mapping[Stage, JobObs]
    pods: tuple[PodObs, ...]
    probe: JobObs | None = None
    probe_pods: tuple[PodObs, ...] = ()


def _pods_of(jobs: Iterable[JobObs], pods: Iterable[Obj]) -> tuple[PodObs, ...]:
    uids = {job.uid for job in jobs if job.uid}
    return tuple(
        observe_pod(p, LABEL_STAGE, COMPLETION_INDEX_LABEL) for p in pods if any(owned_by(p, u) for u in uids)
    )


def children_of(uid: str, jobs: Iterable[Obj], pods: Iterable[Obj]) -> Children:
    """The SFTJob's own stage Jobs and their pods out of the watched ones. A Job being deleted is left out,
    except a group stage's (train, align): its deletion is a group restart's teardown (render/recovery.py)."""
    by_stage: dict[Stage, JobObs] = {}
    probe: JobObs | None = None
    pods = list(pods)
    for j in jobs:
        meta = j.get("metadata") or {}
        stage = (meta.get("labels") or {}).get(LABEL_STAGE)
        if not owned_by(j, uid):
            continue
        if stage == PROBE and not meta.get("deletionTimestamp"):
            probe = observe_job(j)
        if stage not in STAGES or (meta.get("deletionTimestamp") and not STAGE_TABLE[Stage(stage)].group):
            continue
        by_stage[Stage(stage)] = observe_job(j)
    probe_pods = _pods_of([probe], pods) if probe is not None else ()
    return Children(by_stage, _pods_of(by_stage.values(), pods), probe, probe_pods)


@dataclass(frozen=True)
class Observation:
    """Everything one reconcile decides and writes from. `phase` is the phase machine's input."""

    phase: ph.Observed
    prev: SFTJobStatus
    spec: SFTJobSpec | None
    pods: tuple[PodObs, ...]
    restart: RestartPlan
    eval: EvalOutcome
    stuck: Stuck | None
    probe_pods: int = 0  # capacity probe pods wanted now (render/elastic.py)
    grow_held: str | None = None  # a grow that is due but waits for the hourly resize budget: why
    admitted: Admitted | None = None  # a train Job Kueue admitted partially, to size (render/admission.py)

    @property
    def jobs(self) -> Mapping[Stage, JobObs]:
        return self.phase.jobs

    @property
    def runnable(self) -> bool:
        """The spec is valid and no child is in conflict: children may be created and changed."""
        return self.spec is not None and self.phase.spec_error is None and self.phase.name_conflict is None

    def with_jobs(self, jobs: Mapping[Stage, JobObs]) -> Observation:
        """The same observation with the stage Jobs as they are after this reconcile created one."""
        outcome = (
            eval_outcome(self.spec, jobs.get(Stage.EVAL), list(self.pods), self.prev)
            if self.spec
            else EvalOutcome()
        )
        phase = replace(
            self.phase, jobs=dict(jobs), gate_failures=outcome.gate_failures, eval_gate_exit=outcome.gate_exit
        )
        return replace(self, phase=phase, eval=outcome)

    def failing(self, spec_error: str | None = None, name_conflict: str | None = None) -> Observation:
        """The observation once creating a child found the spec at fault or the name taken."""
        phase = replace(
            self.phase,
            spec_error=spec_error or self.phase.spec_error,
            name_conflict=name_conflict or self.phase.name_conflict,
        )
        return replace(self, phase=phase)


def stage_pods(pods: Iterable[PodObs], stage: Stage) -> list[PodObs]:
    return [p for p in pods if p.stage == stage]


def running_pods(pods: Iterable[PodObs], stage: Stage) -> tuple[int, int]:
    """(Running pods of `stage`, those of them being deleted: saving a checkpoint after SIGTERM)."""
    running = [p for p in stage_pods(pods, stage) if p.phase == "Running"]
    return sum(1 for p in running if not p.deleting), sum(1 for p in running if p.deleting)


def observe(
    prev: SFTJobStatus,
    spec: SFTJobSpec | None,
    spec_error: str | None,
    name_conflict: str | None,
    queued: bool,
    jobs: Mapping[Stage, JobObs],
    pods: Iterable[PodObs],
    stuck: Stuck | None,
    stall: Stall | None,
    node_problems: Mapping[str, str],
    now: datetime,
    probe_pods: Iterable[PodObs] = (),
    capacity_since_step: int | None = None,
) -> Observation:
    """The view one reconcile decides from. `stuck`, `stall` and `node_problems` are what the reconcile read
    besides the children (Job events, the step clock, Nodes); all None/empty for a spec that cannot run.
    `probe_pods` and `capacity_since_step`: an elastic run's capacity probe (render/elastic.py)."""
    pods = tuple(pods)
    ok = spec is not None and spec_error is None
    outcome = eval_outcome(spec, jobs.get(Stage.EVAL), list(pods), prev) if spec else EvalOutcome()
    stuck_fail: str | None = None
    if ok and stuck is not None and spec is not None:
        policy = spec.run_policy
        stuck_fail = stuck_failure_message(
            stuck, now, policy.stuck_pending_timeout_seconds, policy.fail_when_stuck_seconds
        )
    restart = RestartPlan(prev)
    probe = 0
    held: str | None = None
    runs = stages(spec) if spec else ph.ALL_STAGES
    group = ph.group_stage(jobs, runs)
    group_job = jobs.get(group)
    ranks = stage_pods(pods, group)
    admitted = plan_admission(spec, group_job, ranks) if ok and spec and group == Stage.TRAIN else None
    if admitted is not None and group_job is not None:  # the Job as it runs: at the size Kueue admitted
        group_job = replace(group_job, nodes=admitted.nodes)
        jobs = {**jobs, group: group_job}
    if ok and spec is not None:
        restart = plan_restart(prev, spec.run_policy, group_job, ranks, stall, now, node_problems, group)
        # Elastic resizes are the training group's only (docs/recovery.md, "Elastic runs").
        if group == Stage.TRAIN and group_job is not None:
            restart, held = _with_resize(
                restart, spec, group_job, ranks, probe_pods, capacity_since_step, now
            )
        if group == Stage.TRAIN and restart.delete is None:
            probe = probe_size(spec, queued, group_job, ranks)
    running, stopping = running_pods(pods, group)
    phase = ph.Observed(
        phase=prev.phase,
        spec_error=spec_error,
        name_conflict=name_conflict,
        suspend=bool(spec.suspend) if spec else False,
        queued=queued,
        jobs=dict(jobs),
        stages=runs,
        gate_failures=outcome.gate_failures,
        running_group_pods=running,
        stopping_group_pods=stopping,
        stuck_failure=stuck_fail,
        eval_gate_exit=outcome.gate_exit,
        curate_failure=failed_pod_message(jobs.get(Stage.CURATE), list(pods), Stage.CURATE),
        group_exit=exit_failure(group_job, ranks, group),
        group_failure=failed_rank_message(group_job, ranks),
        group_restart=restart.group_restart,
        restarts_exhausted=restart.exhausted,
    )
    return Observation(
        phase, prev, spec, pods, restart, outcome, stuck if ok else None, probe, held, admitted
    )


def _with_resize(
    restart: RestartPlan,
    spec: SFTJobSpec,
    train: JobObs,
    ranks: list[PodObs],
    probe_pods: Iterable[PodObs],
    capacity_since_step: int | None,
    now: datetime,
) -> tuple[RestartPlan, str | None]:
    """The restart plan, or, when nothing else restarts the group, the resize render/elastic.py decides;
    and why a due grow waits, if it does."""
    if restart.delete is not None or restart.group_restart or restart.exhausted or train.deleting:
        return restart, None
    prev = restart.status
    if resize_again(prev, train):
        msg = f"tearing down the training group to re-form it at {prev.nodes} node(s)"
        return replace(restart, group_restart=msg, delete=train), None
    resize = plan_resize(spec, prev, train, ranks, list(probe_pods), capacity_since_step, now)
    if resize is None or resize.held:
        return restart, resize.cause if resize else None
    status = record_resize(prev, resize, train, spec.resources.gpus_per_node, now)
    entry = status.recoveries[-1]
    msg = (
        f"re-forming the training group at {resize.nodes} node(s) (world size {entry.from_world_size} ->"
        f" {entry.to_world_size}) from step {entry.resumed_from_step}: {resize.cause}"
    )
    return replace(restart, status=status, group_restart=msg, delete=train), None


def render_status(
    meta: Obj, obs: Observation, decision: ph.Decision, now: datetime, generation: int | None
) -> SFTJobStatus:
    """The whole status this reconcile writes (progress stays the progress reader's)."""
    status = build_status(
        meta,
        obs.restart.status,
        obs.spec,
        decision,
        obs.phase,
        obs.eval.results,
        obs.stuck,
        now,
        generation,
        ChildNames(meta["name"]),
    )
    status.conditions = stalled_condition(status.conditions, obs.restart, now, generation)
    status.conditions = unschedulable_condition(status.conditions, list(obs.pods), now, generation)
    status.tracking = tracking_status(list(obs.pods), obs.prev.tracking)
    if obs.spec is not None:
        group = obs.phase.group
        job = obs.jobs.get(group)
        running = job is not None and not job.deleting and obs.restart.delete is None
        if running and job is not None and job.nodes is not None:
            nodes, gpus = job.nodes, job.gpus_per_node or 0  # the group as it runs
        else:
            nodes, gpus = stage_size(obs.spec, obs.restart.status, group), obs.spec.resources.gpus_per_node
        status.nodes, status.world_size = nodes, world(nodes, gpus)
    return status
