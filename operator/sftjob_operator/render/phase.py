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

from .observe import JobObs

PENDING = "Pending"
TRAINING = "Training"
EVALUATING = "Evaluating"
MERGING = "Merging"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
TERMINAL = (SUCCEEDED, FAILED)
ALL_PHASES = (PENDING, TRAINING, EVALUATING, MERGING, SUCCEEDED, FAILED, SUSPENDED)

# Reasons (CamelCase, stable: alerts and dashboards key on them).
R_INVALID_SPEC = "InvalidSpec"
R_CREATING = "CreatingChildren"
R_QUEUED = "Queued"
R_PODS_PENDING = "PodsPending"
R_PODS_RUNNING = "PodsRunning"
R_RESTARTING = "Restarting"
R_FINISHING = "Finishing"
R_SUSPENDED = "Suspended"
R_EVAL_RUNNING = "EvalRunning"
R_MERGE_RUNNING = "MergeRunning"
R_SUCCEEDED = "Succeeded"
R_TRAINING_FAILED = "TrainingFailed"
R_BACKOFF = "BackoffLimitExceeded"
R_DEADLINE = "DeadlineExceeded"
R_EVAL_FAILED = "EvalFailed"
R_GATE_FAILED = "EvalGateFailed"
R_MERGE_FAILED = "MergeFailed"
R_STUCK = "Stuck"


@dataclass(frozen=True)
class Observed:
    """Everything the phase machine looks at."""

    phase: str | None = None  # current status.phase
    spec_error: str | None = None  # SpecError text: the spec failed validation in the operator
    suspend: bool = False  # spec.suspend
    queued: bool = False  # Kueue manages admission (queue-name label)
    train: JobObs | None = None
    eval: JobObs | None = None
    merge: JobObs | None = None
    eval_enabled: bool = True
    merge_enabled: bool = True
    # Gate failures computed from eval results; None while eval results are not known.
    gate_failures: tuple[str, ...] | None = None
    running_train_pods: int = 0  # train pods in phase Running (not deleting)
    stuck_failure: str | None = None  # set when pods were Stuck past runPolicy.failWhenStuckSeconds
    # The eval pod exited with the trainer's EVAL_GATE_FAILED code; its termination message says which gate.
    eval_gate_exit: str | None = None


@dataclass(frozen=True)
class Decision:
    phase: str
    reason: str
    message: str


def _train_failure(job: JobObs, backoff_limit: int | None = None) -> Decision:
    reason = job.failed_reason or "Failed"
    detail = job.failed_message or reason
    if reason == "PodFailurePolicy":
        return Decision(FAILED, R_TRAINING_FAILED, f"trainer exited with a permanent error: {detail}")
    if reason == "BackoffLimitExceeded":
        return Decision(
            FAILED, R_BACKOFF, f"the trainer failed more often than runPolicy.backoffLimit allows: {detail}"
        )
    if reason == "DeadlineExceeded":
        return Decision(FAILED, R_DEADLINE, f"runPolicy.activeDeadlineSeconds exceeded: {detail}")
    return Decision(FAILED, R_TRAINING_FAILED, f"training Job failed ({reason}): {detail}")


def next_phase(obs: Observed) -> Decision:
    """The phase the SFTJob should be in given what is observed now."""
    if obs.spec_error is not None:
        return Decision(FAILED, R_INVALID_SPEC, obs.spec_error)
    if obs.phase in TERMINAL:
        # Terminal phases are sticky: a later resync (or TTL clean-up deleting the children) changes nothing.
        return Decision(obs.phase, "", "")
    if obs.stuck_failure is not None:
        return Decision(FAILED, R_STUCK, obs.stuck_failure)

    train = obs.train
    if train is None:
        if obs.suspend:
            return Decision(SUSPENDED, R_SUSPENDED, "spec.suspend is true; nothing is running")
        return Decision(PENDING, R_CREATING, "creating the training Job")
    if train.failed_reason is not None:
        return _train_failure(train)
    if not train.complete:
        if obs.suspend:
            return Decision(
                SUSPENDED,
                R_SUSPENDED,
                "training suspended by spec.suspend; resuming continues from the newest checkpoint",
            )
        if train.suspended:
            if obs.queued:
                return Decision(PENDING, R_QUEUED, "waiting for Kueue to admit the training Job")
            return Decision(PENDING, R_PODS_PENDING, "training Job is suspended")
        if obs.running_train_pods > 0 or train.ready > 0:
            return Decision(
                TRAINING,
                R_PODS_RUNNING,
                f"{max(obs.running_train_pods, train.ready)}/{train.completions} trainer pod(s) running",
            )
        if obs.phase == TRAINING and train.failed > 0:
            # A retryable failure: the Job controller is replacing the pod; training resumes from a checkpoint.
            return Decision(
                TRAINING,
                R_RESTARTING,
                f"trainer pod(s) restarting after {train.failed} failure(s); resuming from checkpoint",
            )
        if obs.phase == TRAINING:
            # Pods finished; the Job controller has not marked the Job complete yet.
            return Decision(TRAINING, R_FINISHING, "trainer pod(s) finished; waiting for the Job to complete")
        return Decision(PENDING, R_PODS_PENDING, f"waiting for {train.completions} trainer pod(s) to start")

    # Training is complete.
    if obs.eval_enabled:
        ev = obs.eval
        if ev is None:
            if obs.suspend:
                return Decision(SUSPENDED, R_SUSPENDED, "training done; evaluation waits for spec.suspend")
            return Decision(EVALUATING, R_EVAL_RUNNING, "training complete; starting evaluation")
        if ev.failed_reason is not None and obs.eval_gate_exit is not None:
            return Decision(FAILED, R_GATE_FAILED, "eval gates failed (adapter kept): " + obs.eval_gate_exit)
        if ev.failed_reason is not None:
            return Decision(
                FAILED,
                R_EVAL_FAILED,
                f"evaluation Job failed ({ev.failed_reason}): {ev.failed_message or ev.failed_reason}",
            )
        if not ev.complete:
            if obs.suspend:
                return Decision(SUSPENDED, R_SUSPENDED, "evaluation suspended by spec.suspend")
            if ev.suspended and obs.queued:
                return Decision(EVALUATING, R_QUEUED, "waiting for Kueue to admit the evaluation Job")
            return Decision(EVALUATING, R_EVAL_RUNNING, "evaluating the adapter on held-out data")
        if obs.gate_failures:
            return Decision(
                FAILED, R_GATE_FAILED, "eval gates failed (adapter kept): " + "; ".join(obs.gate_failures)
            )

    if obs.merge_enabled:
        mg = obs.merge
        if mg is None:
            if obs.suspend:
                return Decision(SUSPENDED, R_SUSPENDED, "merge waits for spec.suspend")
            return Decision(MERGING, R_MERGE_RUNNING, "merging the adapter into the base model")
        if mg.failed_reason is not None:
            return Decision(
                FAILED,
                R_MERGE_FAILED,
                f"merge Job failed ({mg.failed_reason}): {mg.failed_message or mg.failed_reason}",
            )
        if not mg.complete:
            if obs.suspend:
                return Decision(SUSPENDED, R_SUSPENDED, "merge suspended by spec.suspend")
            if mg.suspended and obs.queued:
                return Decision(MERGING, R_QUEUED, "waiting for Kueue to admit the merge Job")
            return Decision(MERGING, R_MERGE_RUNNING, "merging the adapter into the base model")

    return Decision(
        SUCCEEDED,
        R_SUCCEEDED,
        "training"
        + (", evaluation" if obs.eval_enabled else "")
        + (" and merge" if obs.merge_enabled else "")
        + " completed",
    )


def active_stage(decision: Decision, obs: Observed) -> str | None:
    """The stage whose Job must exist for `decision` (None: no new Job is needed)."""
    if decision.phase in TERMINAL:
        return None
    if obs.train is None or not obs.train.complete:
        return "train"
    if obs.eval_enabled and (obs.eval is None or not obs.eval.complete):
        return "eval"
    if obs.merge_enabled and (obs.merge is None or not obs.merge.complete):
        return "merge"
    return None


def evaluate_gates(
    results: dict[str, float] | None,
    max_eval_loss: float | None = None,
    max_perplexity: float | None = None,
    min_rouge_l: float | None = None,
    min_exact_match: float | None = None,
) -> tuple[str, ...]:
    """Gate failures ("maxEvalLoss: 2.31 > 2.0"); a configured gate whose metric is missing fails too."""
    checks = (
        ("maxEvalLoss", "evalLoss", max_eval_loss, True),
        ("maxPerplexity", "perplexity", max_perplexity, True),
        ("minRougeL", "rougeL", min_rouge_l, False),
        ("minExactMatch", "exactMatch", min_exact_match, False),
    )
    failures: list[str] = []
    for gate, metric, limit, is_max in checks:
        if limit is None:
            continue
        value = (results or {}).get(metric)
        if value is None:
            failures.append(f"{gate}: {metric} not reported by the evaluation")
        elif is_max and value > limit:
            failures.append(f"{gate}: {value:.4g} > {limit:.4g}")
        elif not is_max and value < limit:
            failures.append(f"{gate}: {value:.4g} < {limit:.4g}")
    return tuple(failures)
