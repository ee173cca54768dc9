"""The phase machine: observed child Jobs -> (phase, reason, message). The heart of the operator.

Level-triggered and idempotent: the result depends only on what is observed now (plus the current phase,
because terminal phases are sticky), never on which event woke the operator up. Kubernetes I/O and the
actions that follow from a decision (create the eval Job when the phase is Evaluating and it does not
exist, ...) live in the handlers.

    Pending -> [Curating -> Pending] -> Training -> [Aligning] -> Evaluating -> Merging -> Succeeded
    any -> Failed (InvalidSpec, NameConflict, CurationFailed, TrainingFailed, SpecChanged, AlignmentFailed,
                   BackoffLimitExceeded, DeadlineExceeded, EvalFailed, EvalGateFailed, MergeFailed, Stuck)
    non-terminal <-> Suspended (spec.suspend)

Curating (only when spec.dataset.curation is set): the curate Job runs alone; the train Job is created only
once it has completed, so no training GPU is held while the data is curated. Aligning (only when
spec.alignment is set) runs between training and evaluation. What each stage's phase, reasons and messages
are is its row in sftjob_api.stage_table: curate, eval and merge are single-pod stages of one shape
(`_single_pod_stage`); train and align, groups of ranks, share the group rules (`_group`): the group stage
the run is in (`group_stage`) is the one whose ranks are restarted, suspended, read and judged for stalls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sftjob_api import STAGE_TABLE, Phase, Reason, Stage
from sftjob_api.stage_table import StageRow

from .observe import JobObs

PENDING = Phase.PENDING
CURATING = Phase.CURATING
TRAINING = Phase.TRAINING
ALIGNING = Phase.ALIGNING
EVALUATING = Phase.EVALUATING
MERGING = Phase.MERGING
SUCCEEDED = Phase.SUCCEEDED
FAILED = Phase.FAILED
SUSPENDED = Phase.SUSPENDED
TERMINAL = (SUCCEEDED, FAILED)
# The stages of a spec without dataset.curation (sftjob_api.stages(spec) says which a spec runs).
ALL_STAGES = (Stage.TRAIN, Stage.EVAL, Stage.MERGE)
# The stages that run as a group of ranks (rows with group=True), and the phases they run in.
GROUP_STAGES = tuple(row.stage for row in STAGE_TABLE.values() if row.group)
GROUP_PHASES = tuple(STAGE_TABLE[s].phase for s in GROUP_STAGES)


def group_stage(jobs: Mapping[Stage, JobObs], stages: tuple[Stage, ...]) -> Stage:
    """The group stage the run is in: the first of the spec's group stages whose Job has not completed (it
    runs, is being restarted, or comes next), else the last one. Its ranks are the ones restarted, read for
    progress and judged for stalls; the others' Jobs have completed or do not exist yet."""
    groups = [s for s in stages if s in GROUP_STAGES] or [Stage.TRAIN]
    return next((s for s in groups if s not in jobs or not jobs[s].complete), groups[-1])


@dataclass(frozen=True)
class Observed:
    """Everything the phase machine looks at."""

    phase: Phase | None = None  # current status.phase
    spec_error: str | None = None  # SpecError text: the spec failed validation in the operator
    name_conflict: str | None = None  # a child's name is taken by someone else's object (render/ownership)
    suspend: bool = False  # spec.suspend
    queued: bool = False  # Kueue manages admission (queue-name label)
    jobs: Mapping[Stage, JobObs] = field(default_factory=dict)  # the live stage Jobs, by stage
    stages: tuple[Stage, ...] = ALL_STAGES  # what the spec runs: sftjob_api.stages(spec)
    # Gate failures computed from eval results; None while eval results are not known.
    gate_failures: tuple[str, ...] | None = None
    # Pods of the group stage the run is in (`group_stage`): Running (not deleting), and still Running after
    # their deletion (SIGTERM: saving a checkpoint).
    running_group_pods: int = 0
    stopping_group_pods: int = 0
    stuck_failure: str | None = None  # set when pods were Stuck past runPolicy.failWhenStuckSeconds
    # The eval pod exited with the trainer's EVAL_GATE_FAILED code; its termination message says which gate.
    eval_gate_exit: str | None = None
    # The failed curate pod's termination message: why curation failed (a data gate, a bad input file).
    curate_failure: str | None = None
    # A rank of the group stage exited with a code the stage table gives a Failed reason of its own
    # (SPEC_CHANGED): that reason and what the pod said (its termination message).
    group_exit: tuple[Reason, str] | None = None
    # The failed group Job's rank in its own words (the termination message of the rank that exited with a
    # permanent code, else of the rank that took the group down).
    group_failure: str | None = None
    # A group restart is under way (render/recovery.py): the failed or stalled group Job is being torn down
    # or re-created. The message says why.
    group_restart: str | None = None
    # A retryable failure (or stall) with runPolicy.backoffLimit used up: the message says which.
    restarts_exhausted: str | None = None

    @property
    def curate(self) -> JobObs | None:
        return self.jobs.get(Stage.CURATE)

    @property
    def train(self) -> JobObs | None:
        return self.jobs.get(Stage.TRAIN)

    @property
    def group(self) -> Stage:
        """The group stage the run is in (`group_stage`)."""
        return group_stage(self.jobs, self.stages)

    @property
    def eval(self) -> JobObs | None:
        return self.jobs.get(Stage.EVAL)

    @property
    def merge(self) -> JobObs | None:
        return self.jobs.get(Stage.MERGE)


GATE_FAILED_PREFIX = "eval gates failed (adapter kept): "
# What a Failed reason of a trainer exit code tells the user to do; the trainer's own message (which fields
# changed) follows.
_SPEC_CHANGED_ADVICE = (
    "the training inputs changed since this run's newest checkpoint, so it cannot be resumed without mixing "
    "two runs (nothing was mixed; the checkpoints are kept). Re-create the SFTJob to start a new run, "
    "warm-started from that checkpoint with spec.training.resumeFrom if you like. The trainer said: "
)
EXIT_ADVICE = {Reason.SPEC_CHANGED: _SPEC_CHANGED_ADVICE}


@dataclass(frozen=True)
class Decision:
    phase: Phase
    reason: str  # a Reason, or "" when a terminal phase is kept as it is
    message: str

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL


def _start(obs: Observed, row: StageRow) -> Decision:
    """The decision when the stage's Job does not exist yet: it is created now (unless spec.suspend)."""
    if obs.suspend:
        return Decision(SUSPENDED, Reason.SUSPENDED, row.waiting_in(obs.stages))
    if row.starts_pending:
        return Decision(PENDING, Reason.CREATING, row.starting_in(obs.stages))
    return Decision(row.phase, row.running, row.starting_in(obs.stages))


def _single_pod_stage(
    obs: Observed, job: JobObs | None, row: StageRow, why: str | None = None
) -> Decision | None:
    """The decision while a single-pod stage (curate, eval, merge) is not done; None once its Job completed.
    `why`: what the failed pod said (its termination message), else the Job's own failure message is used."""
    if job is None:
        return _start(obs, row)
    if job.failed_reason is not None:
        detail = why or job.failed_message or job.failed_reason
        return Decision(FAILED, row.failed, f"{row.noun} Job failed ({job.failed_reason}): {detail}")
    if job.complete:
        return None
    if obs.suspend:
        return Decision(SUSPENDED, Reason.SUSPENDED, f"{row.noun} suspended by spec.suspend")
    if job.suspended and obs.queued:
        return Decision(row.phase, Reason.QUEUED, f"waiting for Kueue to admit the {row.noun} Job")
    return Decision(row.phase, row.running, row.doing)


def curation_done(obs: Observed) -> bool:
    """No curate stage, or its Job completed. A train Job is created only after that, so once one exists
    curation counts as done (a curate Job deleted later is not run again)."""
    return (
        Stage.CURATE not in obs.stages
        or obs.train is not None
        or (obs.curate is not None and obs.curate.complete)
    )


def _group_failure(obs: Observed, job: JobObs, row: StageRow) -> Decision:
    reason = job.failed_reason or "Failed"
    detail = job.failed_message or reason
    if obs.group_exit is not None:
        reason, said = obs.group_exit
        return Decision(FAILED, reason, EXIT_ADVICE.get(reason, "") + said)
    if reason == "PodFailurePolicy":
        said = f"{obs.group_failure} ({detail})" if obs.group_failure else detail
        return Decision(FAILED, row.failed, f"trainer exited with a permanent error: {said}")
    if reason == "BackoffLimitExceeded":
        return Decision(
            FAILED,
            Reason.BACKOFF,
            f"the trainer failed more often than runPolicy.backoffLimit allows: {detail}",
        )
    if reason == "DeadlineExceeded":
        return Decision(FAILED, Reason.DEADLINE, f"runPolicy.activeDeadlineSeconds exceeded: {detail}")
    return Decision(FAILED, row.failed, f"{row.noun} Job failed ({reason}): {detail}")


def _group(obs: Observed, job: JobObs, row: StageRow) -> Decision:
    """The decision while a group stage's Job exists and has not completed. Its pods not running yet: the
    first group (train) shows Pending, a later one (align) its own phase, so the phases only move forward."""
    waiting = PENDING if row.starts_pending else row.phase
    if job.failed_reason is not None:
        return _group_failure(obs, job, row)
    stopping = obs.running_group_pods + obs.stopping_group_pods
    if obs.suspend and stopping and obs.phase != SUSPENDED:
        # Suspended promises a saved checkpoint: until the trainers have exited (SIGTERM makes them save
        # one), the run stays in the stage's phase.
        return Decision(
            row.phase,
            Reason.SUSPENDING,
            f"spec.suspend is true: {stopping} trainer pod(s) saving a checkpoint and stopping",
        )
    if obs.suspend:
        return Decision(
            SUSPENDED,
            Reason.SUSPENDED,
            f"{row.noun} suspended by spec.suspend; resuming continues from the newest checkpoint",
        )
    if job.suspended:
        if obs.queued:
            return Decision(waiting, Reason.QUEUED, f"waiting for Kueue to admit the {row.noun} Job")
        return Decision(waiting, Reason.PODS_PENDING, f"{row.noun} Job is suspended")
    if (obs.running_group_pods > 0 or job.ready > 0) and obs.phase == SUSPENDED:
        # Just resumed: pods seen Running are the suspended Job's, their deletion not seen yet (the Job's
        # own suspend may not even be in the watch cache), so not running yet: Suspended -> Pending.
        return Decision(waiting, Reason.PODS_PENDING, "resuming: waiting for trainer pod(s) to start")
    if obs.running_group_pods > 0 or job.ready > 0:
        return Decision(
            row.phase,
            Reason.PODS_RUNNING,
            f"{max(obs.running_group_pods, job.ready)}/{job.completions} trainer pod(s) running",
        )
    if obs.phase == row.phase and job.failed > 0:
        # A retryable failure: the Job controller is replacing the pod; the stage resumes from a checkpoint.
        return Decision(
            row.phase,
            Reason.RESTARTING,
            f"trainer pod(s) restarting after {job.failed} failure(s); resuming from checkpoint",
        )
    if obs.phase == row.phase and (job.active > 0 or job.succeeded == 0):
        # A re-created group (or a replaced pod) whose pods do not run yet; a Job just re-created after a
        # group restart has no pods at all yet (none finished: not Finishing).
        return Decision(
            row.phase, Reason.RESTARTING, f"waiting for {job.completions} trainer pod(s) to start"
        )
    if obs.phase == row.phase:
        # Pods finished; the Job controller has not marked the Job complete yet.
        return Decision(
            row.phase, Reason.FINISHING, "trainer pod(s) finished; waiting for the Job to complete"
        )
    return Decision(waiting, Reason.PODS_PENDING, f"waiting for {job.completions} trainer pod(s) to start")


def _ended(obs: Observed) -> Decision | None:
    """The end that the observation decides before any stage Job is looked at."""
    if obs.spec_error is not None:
        return Decision(FAILED, Reason.INVALID_SPEC, obs.spec_error)
    if obs.name_conflict is not None:
        return Decision(FAILED, Reason.NAME_CONFLICT, obs.name_conflict)
    if obs.phase is not None and obs.phase in TERMINAL:
        # Terminal phases are sticky: a later resync (or TTL clean-up deleting the children) changes nothing.
        return Decision(obs.phase, "", "")
    if obs.stuck_failure is not None:
        return Decision(FAILED, Reason.STUCK, obs.stuck_failure)
    if obs.restarts_exhausted is not None:
        return Decision(FAILED, Reason.BACKOFF, obs.restarts_exhausted)
    return None


def next_phase(obs: Observed) -> Decision:
    """The phase the SFTJob should be in given what is observed now: the first of the spec's stages that
    is not done decides (a group stage by `_group`'s rules, the others alike)."""
    ended = _ended(obs)
    if ended is not None:
        return ended
    if obs.group_restart is not None:
        row = STAGE_TABLE[obs.group]
        if obs.suspend:
            return Decision(
                SUSPENDED, Reason.SUSPENDED, f"spec.suspend is true; the {row.noun} group restarts on resume"
            )
        return Decision(row.phase, Reason.RESTARTING, obs.group_restart)

    for stage in obs.stages:
        row = STAGE_TABLE[stage]
        job = obs.jobs.get(stage)
        if stage == Stage.CURATE and curation_done(obs):
            continue
        if row.group:
            if job is None:
                return _start(obs, row)
            if not job.complete:
                return _group(obs, job, row)
            continue
        if stage == Stage.EVAL and job is not None and job.failed_reason is not None and obs.eval_gate_exit:
            return Decision(FAILED, Reason.GATE_FAILED, GATE_FAILED_PREFIX + obs.eval_gate_exit)
        decided = _single_pod_stage(obs, job, row, obs.curate_failure if stage == Stage.CURATE else None)
        if decided is not None:
            return decided
        if stage == Stage.EVAL and obs.gate_failures:
            return Decision(FAILED, Reason.GATE_FAILED, GATE_FAILED_PREFIX + "; ".join(obs.gate_failures))

    return Decision(SUCCEEDED, Reason.SUCCEEDED, succeeded_message(obs.stages))


def succeeded_message(stages: tuple[Stage, ...]) -> str:
    """The nouns of the stages that ran: e.g. "curation, training, evaluation and merge completed"."""
    nouns = [STAGE_TABLE[s].noun for s in stages]
    done = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " and " + nouns[-1]
    return done + " completed"


# Pending, then each stage's phase in run order (Training before Aligning); a Pending decision once curation
# is done (the train Job's Pending) sits between Curating and Training.
_FORWARD = {PENDING: 0.0} | {row.phase: float(i + 1) for i, row in enumerate(STAGE_TABLE.values())}
_PENDING_CURATED = _FORWARD[CURATING] + 0.5


def goes_back(prev: Phase | None, new: Phase, curated: bool = False) -> bool:
    """Whether `new` is an earlier step of Pending -> Curating -> Training -> Aligning -> Evaluating -> Merging than
    `prev`. `curated`: the view shows curation done (`curation_done`), so a Pending decision is the train
    Job's, after Curating (a spec without a curate stage is always curated).

    The status records progress the children proved when it was written; a view of the children that
    decides an earlier phase is usually stale (another replica wrote the status; this one's watch caches
    lag), so the reconciler reads the children afresh before it believes it (Kueue preemption or a deleted
    Job can still move a phase back, and then the fresh read says so too)."""
    if prev not in _FORWARD or new not in _FORWARD:
        return False
    rank = _PENDING_CURATED if new == PENDING and curated else _FORWARD[new]
    return rank < _FORWARD[prev]


def active_stage(obs: Observed) -> Stage | None:
    """The stage the run is at: the first of the spec's stages whose Job has not completed (None: all done,
    or the run has ended)."""
    if _ended(obs) is not None:
        return None
    for stage in obs.stages:
        if stage == Stage.CURATE and curation_done(obs):
            continue
        job = obs.jobs.get(stage)
        if job is None or not job.complete:
            return stage
        if stage == Stage.EVAL and obs.gate_failures:
            return None  # Failed/EvalGateFailed: no merge
    return None


def stage_to_create(obs: Observed) -> Stage | None:
    """The stage Job to create now: the active stage, when it has no Job yet. Created before the decision,
    so that the decision (and the one status write of this transition) already sees it."""
    stage = active_stage(obs)
    return stage if stage is not None and stage not in obs.jobs else None
