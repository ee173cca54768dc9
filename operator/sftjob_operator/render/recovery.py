"""Group recovery, decided purely: why a group of ranks failed, whether its restart counts against
runPolicy.backoffLimit, whether a run has stalled, and the status.recoveries entry of a restart.

The mechanism (see docs/recovery.md): a group stage's Job (train, and align with spec.alignment) runs with
`backoffLimit: 0`, so the first failed pod fails the whole Job and the Job controller terminates the
surviving ranks at once; the operator then records one recovery, deletes the Job (foreground: its pods are
gone before it is) and creates it again, and the new group resumes from the newest complete checkpoint. A
stall is handled the same way, without the Job failing. The group is the one the run is in
(render/phase.py: group_stage); the budget (runPolicy.backoffLimit) is the run's, shared by its groups.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import pairwise

from sftjob_api import STAGE_TABLE, Stage
from sftjob_api.run_policy import RunPolicy
from sftjob_api.status import MAX_RECOVERIES, Condition, RankEnd, Recovery, SFTJobStatus

from .bad_nodes import blamed_node, down_under
from .conditions import get_condition, set_condition
from .observe import JobObs, PodObs
from .rank_ends import describe, first_failed, rank_ends

# The Job's failure reasons that a group restart answers (the rest are final: PodFailurePolicy = a permanent
# exit code, DeadlineExceeded = runPolicy.activeDeadlineSeconds).
RETRYABLE_JOB_FAILURES = ("BackoffLimitExceeded",)
STALLED = "Stalled"
# How many step advances the median step time is taken over.
STEP_WINDOW = 20

_CHECKPOINT_STEP = re.compile(r"/checkpoints/(?:[^/]+/)?step-(\d+)/?$")


# The `cause` label of sftjob_operator_recoveries_total.
CAUSE_KINDS = ("Failed", "Disrupted", "Stalled", "Resized")


def cause_kind(rec: Recovery) -> str:
    """Failed (a counted pod failure), Disrupted (preemption, drain, node lost: not counted), Stalled, or
    Resized (the group re-formed at another size: render/elastic.py)."""
    if rec.to_world_size is not None:
        return "Resized"
    return STALLED if rec.cause.startswith(STALLED) else "Failed" if rec.counted else "Disrupted"


@dataclass(frozen=True)
class Failure:
    """What took the group down."""

    cause: str
    counted: bool
    node: str | None = None  # the node it points at (render/bad_nodes.py): later attempts avoid it
    # how each rank of the attempt ended, the cause first
    ranks: tuple[RankEnd, ...] = field(default=(), compare=False)


def _node_of(pods: list[PodObs], problems: Mapping[str, str]) -> str | None:
    """The node a failed attempt points at: one whose pod's failure blames it, or a rank's node that is
    NotReady or gone now (cause pod first: `pods` comes sorted)."""
    for p in pods:
        node = blamed_node(p) or (p.node if p.node in problems else None)
        if node:
            return node
    return None


def classify_failure(pods: list[PodObs], problems: Mapping[str, str] | None = None) -> Failure:
    """The train pods of one failed Job attempt -> the cause. A disrupted pod (preemption, drain, eviction,
    node lost: pod condition DisruptionTarget), failed or still terminating, makes the whole failure
    uncounted: the other ranks' errors (connection reset, or exit 143 after the checkpoint all ranks agree
    on when one gets SIGTERM) are its consequences and may well reach the Job first. `problems` (node ->
    why it is unusable) names the node the failure points at."""
    problems = problems or {}
    disrupted = next((p for p in sorted(pods, key=lambda p: (p.index or 0, p.name)) if p.disruption), None)
    failed = sorted(
        (p for p in pods if p.phase == "Failed"), key=lambda p: (p.deleting, p.index or 0, p.name)
    )
    node = _node_of([p for p in (disrupted, *failed) if p is not None], problems)
    on = f" on node {node}" + (f" ({problems[node]})" if node in problems else "") if node else ""
    if disrupted is not None:
        return Failure(
            f"pod {disrupted.name} (rank {disrupted.index}) disrupted{on}: {disrupted.disruption}",
            False,
            node,
            tuple(rank_ends(pods, disrupted)),
        )
    # A rank whose node failed is the cause: the others' errors (connection reset) are its consequence.
    # Else the rank that ended first on its own (render/rank_ends.py), not the first pod seen.
    first = next((p for p in failed if p.node and p.node == node), None) or first_failed(failed)
    if first is None:
        return Failure("a training pod failed" + on, True, node, tuple(rank_ends(pods, None)))
    # A failure the node caused (eviction, node lost) is a disruption: not counted.
    return Failure(
        f"pod {first.name} (rank {first.index}) {describe(first)}{on}",
        node is None,
        node,
        tuple(rank_ends(pods, first)),
    )


def node_down(pods: list[PodObs], problems: Mapping[str, str]) -> Failure | None:
    """A live rank whose node is NotReady or gone: the group is lost with it (not counted)."""
    down = down_under(pods, problems)
    if down is None:
        return None
    pod, problem = down
    return Failure(f"node {pod.node} {problem} under pod {pod.name} (rank {pod.index})", False, pod.node)


def checkpoint_step_of(uri: str | None) -> int:
    """Step of status.artifacts.latestCheckpoint (`.../checkpoints/<run>/step-N/`); 0 when there is none."""
    m = _CHECKPOINT_STEP.search(uri or "")
    return int(m.group(1)) if m else 0


def recovered(status: SFTJobStatus, job_uid: str) -> bool:
    """Whether the Job attempt `job_uid` was already restarted (a recovery is recorded once per attempt)."""
    return bool(job_uid) and any(r.train_job_uid == job_uid for r in status.recoveries)


def budget_left(status: SFTJobStatus, policy: RunPolicy) -> bool:
    return status.restarts < policy.backoff_limit


def recovery_stage(rec: Recovery) -> Stage:
    """The group stage a recovery restarted (entries of operators before alignment: train)."""
    return Stage(rec.stage) if rec.stage in STAGE_TABLE else Stage.TRAIN


def record_recovery(
    prev: SFTJobStatus, failure: Failure, job: JobObs, now: datetime, stage: Stage = Stage.TRAIN
) -> SFTJobStatus:
    """prev + one recovery of `stage`'s group (bounded list, newest last); restarts +1 when it counts."""
    resumed = checkpoint_step_of(prev.artifacts.latest_checkpoint if prev.artifacts else None)
    failed_step = prev.progress.step if prev.progress else None
    entry = Recovery(
        time=now,
        cause=failure.cause[:1024],
        counted=failure.counted,
        failed_step=failed_step,
        resumed_from_step=resumed,
        steps_lost=max(failed_step - resumed, 0) if failed_step is not None else None,
        train_job_uid=job.uid,
        stage=None if stage == Stage.TRAIN else str(stage),
        node=failure.node,
        ranks=list(failure.ranks),
    )
    return prev.model_copy(
        update={
            "recoveries": [*prev.recoveries, entry][-MAX_RECOVERIES:],
            "restarts": prev.restarts + (1 if failure.counted else 0),
        }
    )


def with_downtime(
    status: SFTJobStatus, step: int, now: datetime, stage: Stage = Stage.TRAIN
) -> SFTJobStatus | None:
    """The newest recovery gets its downtime when a step of its group stage after the one it resumed from is
    first seen (another stage's steps count from 0 again: they say nothing about it)."""
    if not status.recoveries:
        return None
    last = status.recoveries[-1]
    if last.downtime_seconds is not None or step <= last.resumed_from_step or now <= last.time:
        return None
    if recovery_stage(last) != stage:
        return None
    done = last.model_copy(update={"downtime_seconds": round((now - last.time).total_seconds(), 1)})
    return status.model_copy(update={"recoveries": [*status.recoveries[:-1], done]})


# ---- hang detection -----------------------------------------------------------------------------------------


@dataclass
class StepClock:
    """When each new step value was first seen for one train Job attempt (the progress reader feeds it)."""

    job_uid: str = ""
    advances: list[tuple[datetime, int]] | None = None

    def observe(self, job_uid: str, step: int, now: datetime) -> None:
        if job_uid != self.job_uid or not self.advances or step < self.advances[-1][1]:
            self.job_uid, self.advances = job_uid, [(now, step)]
        elif step > self.advances[-1][1]:
            self.advances = [*self.advances, (now, step)][-(STEP_WINDOW + 1) :]


@dataclass(frozen=True)
class Stall:
    step: int
    seconds: float
    threshold: float

    @property
    def subject(self) -> str:
        return f"step {self.step} has not advanced"

    @property
    def message(self) -> str:
        return (
            f"{self.subject} for {self.seconds:.0f}s"
            f" (threshold {self.threshold:.0f}s: runPolicy.stallFactor x median step time,"
            " at least runPolicy.stallFloorSeconds)"
        )


def median_step_seconds(advances: list[tuple[datetime, int]]) -> float | None:
    per_step = [(t1 - t0).total_seconds() / (s1 - s0) for (t0, s0), (t1, s1) in pairwise(advances) if s1 > s0]
    return statistics.median(per_step) if per_step else None


def stall_now(
    clock: StepClock,
    job: JobObs | None,
    running_pods: int,
    phase: str | None,
    suspend: bool,
    policy: RunPolicy,
    now: datetime,
    group: Stage = Stage.TRAIN,
) -> Stall | None:
    """The stall of the group stage the run is in (`job`, with `running_pods` of its pods Running) to act on
    now. While none of its pods runs (suspended, queued, between two groups) the clock starts afresh, so the
    next step seen is not judged against the time before; only a run in the stage's phase (Training,
    Aligning) that is not being suspended is judged."""
    if job is None or job.suspended or not running_pods:
        clock.job_uid, clock.advances = "", None
        return None
    if phase != STAGE_TABLE[group].phase or suspend:
        return None
    return detect_stall(clock, job.uid, policy, now)


def detect_stall(clock: StepClock, job_uid: str, policy: RunPolicy, now: datetime) -> Stall | None:
    """A stall: the step of this Job attempt unchanged for max(stallFloorSeconds, stallFactor x median step
    time). None when disabled (stallFactor 0), before any step was seen, or for another attempt's clock."""
    if policy.stall_factor <= 0 or not clock.advances or clock.job_uid != job_uid:
        return None
    since, step = clock.advances[-1]
    median = median_step_seconds(clock.advances)
    threshold = max(float(policy.stall_floor_seconds), policy.stall_factor * (median or 0.0))
    seconds = (now - since).total_seconds()
    return Stall(step, seconds, threshold) if seconds >= threshold else None


# ---- the plan of one reconcile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPlan:
    status: SFTJobStatus  # the previous status, plus the recovery recorded now (if any)
    group_restart: str | None = None  # phase Training/Restarting with this message
    exhausted: str | None = None  # phase Failed/BackoffLimitExceeded with this message
    delete: JobObs | None = None  # the train Job attempt to tear down (after the status is written)
    stall: Stall | None = None  # the stall seen now (condition Stalled)
    # Pods of a torn-down attempt on a NotReady/gone node: no kubelet confirms their end, so they are
    # deleted at once (grace 0); otherwise the foreground deletion of their Job never completes.
    force_delete: tuple[PodObs, ...] = ()


def plan_restart(
    prev: SFTJobStatus,
    policy: RunPolicy,
    train: JobObs | None,
    train_pods: list[PodObs],
    stall: Stall | None,
    now: datetime,
    problems: Mapping[str, str] | None = None,
    stage: Stage = Stage.TRAIN,
) -> RestartPlan:
    """What a restart of `stage`'s group (`train`: its Job, `train_pods`: its ranks) needs now: record it
    (once per Job attempt), tear down, wait, or give up. `problems`: node -> why it is unusable (NotReady,
    gone), for the nodes of its pods."""
    problems = problems or {}
    failure: Failure | None = None
    if train is not None and not train.deleting:
        if train.failed_reason in RETRYABLE_JOB_FAILURES:
            failure = classify_failure(train_pods, problems)
        elif not train.finished and not train.suspended:
            failure = node_down(train_pods, problems)
            if failure is None and stall is not None:
                failure = Failure(f"{STALLED}: {stall.message}", True)
    plan = _plan(prev, policy, stage, train, failure, now)
    force: tuple[PodObs, ...] = ()
    if plan.delete is not None or (train is not None and train.deleting):
        force = tuple(p for p in train_pods if p.node in problems and p.phase not in ("Succeeded", "Failed"))
    return replace(plan, stall=stall, force_delete=force)


def _plan(
    prev: SFTJobStatus,
    policy: RunPolicy,
    stage: Stage,
    train: JobObs | None,
    failure: Failure | None,
    now: datetime,
) -> RestartPlan:
    row = STAGE_TABLE[stage]
    last = prev.recoveries[-1] if prev.recoveries else None
    if train is None:
        if (
            last is not None
            and last.downtime_seconds is None
            and recovery_stage(last) == stage
            and prev.phase == row.phase
        ):
            return RestartPlan(prev, group_restart=f"re-creating the {row.noun} group after {last.cause}")
        return RestartPlan(prev)
    if train.deleting:
        cause = last.cause if last is not None else "its deletion"
        return RestartPlan(prev, group_restart=f"tearing down the {row.noun} group after {cause}")
    if failure is None:
        return RestartPlan(prev)
    if recovered(prev, train.uid):
        return RestartPlan(
            prev, group_restart=f"tearing down the {row.noun} group after {failure.cause}", delete=train
        )
    if failure.counted and not budget_left(prev, policy):
        return RestartPlan(
            prev,
            exhausted=f"{failure.cause}; {prev.restarts} group restart(s) used, runPolicy.backoffLimit is"
            f" {policy.backoff_limit}",
        )
    status = record_recovery(prev, failure, train, now, stage)
    entry = status.recoveries[-1]
    count = f"restart {status.restarts}/{policy.backoff_limit}" if failure.counted else "not counted"
    lost = f", {entry.steps_lost} step(s) lost" if entry.steps_lost is not None else ""
    return RestartPlan(
        status,
        group_restart=f"restarting every rank from step {entry.resumed_from_step} after {failure.cause}"
        f" ({count}{lost})",
        delete=train,
    )


def stalled_condition(
    conds: list[Condition], plan: RestartPlan, now: datetime, generation: int | None
) -> list[Condition]:
    """Stalled=True while a stall is seen (the message names the last step and the time since it advanced);
    False once it is not (the group was restarted, or the step moved again). One stall is one write: while
    the old group is torn down the same stall is seen on every tick, and its growing "for Ns" is not news."""
    old = get_condition(conds, "Stalled")
    if plan.stall is not None:
        if old is not None and old.status == "True" and old.message.startswith(plan.stall.subject + " "):
            return conds
        return set_condition(conds, "Stalled", "True", STALLED, plan.stall.message, now, generation)
    if old is not None and old.status == "True":
        return set_condition(conds, "Stalled", "False", "Progressing", f"was: {old.message}", now, generation)
    return conds
