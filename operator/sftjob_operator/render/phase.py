"""The phase machine: observed child Jobs -> (phase, reason, message). The heart of the operator.

Level-triggered and idempotent: the result depends only on what is observed now (plus the current phase,
because terminal phases are sticky), never on which event woke the operator up. Kubernetes I/O and the
actions that follow from a decision (create the eval Job when the phase is Evaluating and it does not
exist, ...) live in the handlers.

    Pending -> Training -> Evaluating -> Merging -> Succeeded
    any -> Failed (InvalidSpec, TrainingFailed, BackoffLimitExceeded, DeadlineExceeded, EvalFailed,
                   EvalGateFailed, MergeFailed, Stuck)
    non-terminal <-> Suspended (spec.suspend)
"""

from __future__ import annotations

from dataclasses import dataclass

from sftjob_api import Phase, Reason, Stage

from .observe import JobObs

PENDING = Phase.PENDING
TRAINING = Phase.TRAINING
EVALUATING = Phase.EVALUATING
MERGING = Phase.MERGING
SUCCEEDED = Phase.SUCCEEDED
FAILED = Phase.FAILED
SUSPENDED = Phase.SUSPENDED
TERMINAL = (SUCCEEDED, FAILED)
ALL_STAGES = tuple(Stage)


@dataclass(frozen=True)
class Observed:
    """Everything the phase machine looks at."""

    phase: Phase | None = None  # current status.phase
    spec_error: str | None = None  # SpecError text: the spec failed validation in the operator
    suspend: bool = False  # spec.suspend
    queued: bool = False  # Kueue manages admission (queue-name label)
    train: JobObs | None = None
    eval: JobObs | None = None
    merge: JobObs | None = None
    stages: tuple[Stage, ...] = ALL_STAGES  # what the spec runs: sftjob_api.stages(spec)
    # Gate failures computed from eval results; None while eval results are not known.
    gate_failures: tuple[str, ...] | None = None
    running_train_pods: int = 0  # train pods in phase Running (not deleting)
    stopping_train_pods: int = (
        0  # train pods still Running after their deletion (SIGTERM: saving a checkpoint)
    )
    stuck_failure: str | None = None  # set when pods were Stuck past runPolicy.failWhenStuckSeconds
    # The eval pod exited with the trainer's EVAL_GATE_FAILED code; its termination message says which gate.
    eval_gate_exit: str | None = None
    # A group restart is under way (render/recovery.py): the failed or stalled train Job is being torn down
    # or re-created. The message says why.
    group_restart: str | None = None
    # A retryable failure (or stall) with runPolicy.backoffLimit used up: the message says which.
    restarts_exhausted: str | None = None


@dataclass(frozen=True)
class Decision:
    phase: Phase
    reason: str  # a Reason, or "" when a terminal phase is kept as it is
    message: str

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL


def _train_failure(job: JobObs) -> Decision:
    reason = job.failed_reason or "Failed"
    detail = job.failed_message or reason
    if reason == "PodFailurePolicy":
        return Decision(FAILED, Reason.TRAINING_FAILED, f"trainer exited with a permanent error: {detail}")
    if reason == "BackoffLimitExceeded":
        return Decision(
            FAILED,
            Reason.BACKOFF,
            f"the trainer failed more often than runPolicy.backoffLimit allows: {detail}",
        )
    if reason == "DeadlineExceeded":
        return Decision(FAILED, Reason.DEADLINE, f"runPolicy.activeDeadlineSeconds exceeded: {detail}")
    return Decision(FAILED, Reason.TRAINING_FAILED, f"training Job failed ({reason}): {detail}")


def next_phase(obs: Observed) -> Decision:
    """The phase the SFTJob should be in given what is observed now."""
    if obs.spec_error is not None:
        return Decision(FAILED, Reason.INVALID_SPEC, obs.spec_error)
    if obs.phase is not None and obs.phase in TERMINAL:
        # Terminal phases are sticky: a later resync (or TTL clean-up deleting the children) changes nothing.
        return Decision(obs.phase, "", "")
    if obs.stuck_failure is not None:
        return Decision(FAILED, Reason.STUCK, obs.stuck_failure)
    if obs.restarts_exhausted is not None:
        return Decision(FAILED, Reason.BACKOFF, obs.restarts_exhausted)
    if obs.group_restart is not None:
        if obs.suspend:
            return Decision(
                SUSPENDED, Reason.SUSPENDED, "spec.suspend is true; the training group restarts on resume"
            )
        return Decision(TRAINING, Reason.RESTARTING, obs.group_restart)

    train = obs.train
    if train is None:
        if obs.suspend:
            return Decision(SUSPENDED, Reason.SUSPENDED, "spec.suspend is true; nothing is running")
        return Decision(PENDING, Reason.CREATING, "creating the training Job")
    if train.failed_reason is not None:
        return _train_failure(train)
    if not train.complete:
        stopping = obs.running_train_pods + obs.stopping_train_pods
        if obs.suspend and stopping and obs.phase != SUSPENDED:
            # Suspended promises a saved checkpoint: until the trainers have exited (SIGTERM makes them save
            # one), the run is still Training.
            return Decision(
                TRAINING,
                Reason.SUSPENDING,
                f"spec.suspend is true: {stopping} trainer pod(s) saving a checkpoint and stopping",
            )
        if obs.suspend:
            return Decision(
                SUSPENDED,
                Reason.SUSPENDED,
                "training suspended by spec.suspend; resuming continues from the newest checkpoint",
            )
        if train.suspended:
            if obs.queued:
                return Decision(PENDING, Reason.QUEUED, "waiting for Kueue to admit the training Job")
            return Decision(PENDING, Reason.PODS_PENDING, "training Job is suspended")
        if (obs.running_train_pods > 0 or train.ready > 0) and obs.phase == SUSPENDED:
            # Just resumed: pods seen Running are the suspended Job's, their deletion not seen yet (the Job's
            # own suspend may not even be in the watch cache), so not Training yet: Suspended -> Pending.
            return Decision(PENDING, Reason.PODS_PENDING, "resuming: waiting for trainer pod(s) to start")
        if obs.running_train_pods > 0 or train.ready > 0:
            return Decision(
                TRAINING,
                Reason.PODS_RUNNING,
                f"{max(obs.running_train_pods, train.ready)}/{train.completions} trainer pod(s) running",
            )
        if obs.phase == TRAINING and train.failed > 0:
            # A retryable failure: the Job controller is replacing the pod; training resumes from a checkpoint.
            return Decision(
                TRAINING,
                Reason.RESTARTING,
                f"trainer pod(s) restarting after {train.failed} failure(s); resuming from checkpoint",
            )
        if obs.phase == TRAINING and (train.active > 0 or train.succeeded == 0):
            # A re-created group (or a replaced pod) whose pods do not run yet; a Job just re-created after a
            # group restart has no pods at all yet (none finished: not Finishing).
            return Decision(
                TRAINING, Reason.RESTARTING, f"waiting for {train.completions} trainer pod(s) to start"
            )
        if obs.phase == TRAINING:
            # Pods finished; the Job controller has not marked the Job complete yet.
            return Decision(
                TRAINING, Reason.FINISHING, "trainer pod(s) finished; waiting for the Job to complete"
            )
        return Decision(
            PENDING, Reason.PODS_PENDING, f"waiting for {train.completions} trainer pod(s) to start"
        )

    # Training is complete.
    if Stage.EVAL in obs.stages:
        ev = obs.eval
        if ev is None:
            if obs.suspend:
                return Decision(
                    SUSPENDED, Reason.SUSPENDED, "training done; evaluation waits for spec.suspend"
                )
            return Decision(EVALUATING, Reason.EVAL_RUNNING, "training complete; starting evaluation")
        if ev.failed_reason is not None and obs.eval_gate_exit is not None:
            return Decision(
                FAILED, Reason.GATE_FAILED, "eval gates failed (adapter kept): " + obs.eval_gate_exit
            )
        if ev.failed_reason is not None:
            return Decision(
                FAILED,
                Reason.EVAL_FAILED,
                f"evaluation Job failed ({ev.failed_reason}): {ev.failed_message or ev.failed_reason}",
            )
        if not ev.complete:
            if obs.suspend:
                return Decision(SUSPENDED, Reason.SUSPENDED, "evaluation suspended by spec.suspend")
            if ev.suspended and obs.queued:
                return Decision(EVALUATING, Reason.QUEUED, "waiting for Kueue to admit the evaluation Job")
            return Decision(EVALUATING, Reason.EVAL_RUNNING, "evaluating the adapter on held-out data")
        if obs.gate_failures:
            return Decision(
                FAILED,
                Reason.GATE_FAILED,
                "eval gates failed (adapter kept): " + "; ".join(obs.gate_failures),
            )

    if Stage.MERGE in obs.stages:
        mg = obs.merge
        if mg is None:
            if obs.suspend:
                return Decision(SUSPENDED, Reason.SUSPENDED, "merge waits for spec.suspend")
            return Decision(MERGING, Reason.MERGE_RUNNING, "merging the adapter into the base model")
        if mg.failed_reason is not None:
            return Decision(
                FAILED,
                Reason.MERGE_FAILED,
                f"merge Job failed ({mg.failed_reason}): {mg.failed_message or mg.failed_reason}",
            )
        if not mg.complete:
            if obs.suspend:
                return Decision(SUSPENDED, Reason.SUSPENDED, "merge suspended by spec.suspend")
            if mg.suspended and obs.queued:
                return Decision(MERGING, Reason.QUEUED, "waiting for Kueue to admit the merge Job")
            return Decision(MERGING, Reason.MERGE_RUNNING, "merging the adapter into the base model")

    return Decision(
        SUCCEEDED,
        Reason.SUCCEEDED,
        "training"
        + (", evaluation" if Stage.EVAL in obs.stages else "")
        + (" and merge" if Stage.MERGE in obs.stages else "")
        + " completed",
    )


_FORWARD = {PENDING: 0, TRAINING: 1, EVALUATING: 2, MERGING: 3}


def goes_back(prev: Phase | None, new: Phase) -> bool:
    """Whether `new` is an earlier step of Pending -> Training -> Evaluating -> Merging than `prev`.

    The status records progress the children proved when it was written; a view of the children that
    decides an earlier phase is usually stale (another replica wrote the status; this one's watch caches
    lag), so the reconciler reads the children afresh before it believes it (Kueue preemption or a deleted
    Job can still move a phase back, and then the fresh read says so too)."""
    return prev in _FORWARD and new in _FORWARD and _FORWARD[new] < _FORWARD[prev]


def active_stage(decision: Decision, obs: Observed) -> Stage | None:
    """The stage whose Job must exist for `decision` (None: no new Job is needed)."""
    if decision.terminal:
        return None
    jobs = {Stage.TRAIN: obs.train, Stage.EVAL: obs.eval, Stage.MERGE: obs.merge}
    for stage in obs.stages:
        job = jobs[stage]
        if job is None or not job.complete:
            return stage
    return None
