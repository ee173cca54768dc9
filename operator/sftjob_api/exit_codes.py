"""Exit codes of the trainer: a contract with the Job's podFailurePolicy (rendered by the operator).

0 success; PERMANENT (2) means retrying cannot help (bad config, bad or empty data, a model that cannot be
loaded as configured) and maps to `FailJob`, as do EVAL_GATE_FAILED (3) and SPEC_CHANGED (4); every other non-zero code is
retryable and the next pod resumes from the newest complete checkpoint.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # Unexpected crash (Python's default for an uncaught exception): retryable.
    RETRYABLE = 1
    # Bad config, bad data, empty data after filtering: retrying cannot help.
    PERMANENT = 2
    # The eval stage ran fine but a spec.eval.gates threshold did not hold: the merge must not run and
    # retrying cannot change the result (the operator ends Failed/EvalGateFailed and keeps the adapter).
    EVAL_GATE_FAILED = 3
    # This run's newest checkpoint was written under another spec fingerprint (model, data, method or
    # training hyper-parameters changed since): resuming would silently mix two runs, starting over would
    # silently drop one. Retrying cannot help (docs/recovery.md, "Checkpoints and run identity").
    SPEC_CHANGED = 4
    # Storage (S3) unreachable or failing after retries: retryable.
    STORAGE = 75  # EX_TEMPFAIL
    # SIGTERM received (preemption, node drain, `kubectl delete pod`): a checkpoint was saved; retryable.
    PREEMPTED = 143


# The codes the Job's podFailurePolicy turns into FailJob (no retry).
PERMANENT_CODES = (ExitCode.PERMANENT, ExitCode.EVAL_GATE_FAILED, ExitCode.SPEC_CHANGED)


class TrainerError(Exception):
    """Base class: carries the exit code the process should end with."""

    exit_code = ExitCode.RETRYABLE


class PermanentError(TrainerError):
    """Bad config or bad data: the Job must fail without retries."""

    exit_code = ExitCode.PERMANENT


class EvalGateFailed(TrainerError):
    """An eval gate did not hold (see EVAL_GATE_FAILED)."""

    exit_code = ExitCode.EVAL_GATE_FAILED


class SpecChanged(PermanentError):
    """The run's own checkpoint does not belong to this spec (see SPEC_CHANGED)."""

    exit_code = ExitCode.SPEC_CHANGED


class StorageError(TrainerError):
    """Object storage failed after retries: retry the pod."""

    exit_code = ExitCode.STORAGE


class Preempted(TrainerError):
    """SIGTERM arrived; a checkpoint was written before exiting."""

    exit_code = ExitCode.PREEMPTED
