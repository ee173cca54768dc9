"""`spec.runPolicy`: retries, deadlines, clean-up, and recovery of the training group (collective timeout,
hang detection). See docs/run-policy.md and docs/recovery.md."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel, CelRule


class ElasticPolicy(ApiModel):
    """An elastic training group: fewer nodes when some are lost and none replace them, more when capacity
    returns (docs/recovery.md, "Elastic runs"). The trainer resumes its checkpoint at any world size and
    keeps the global batch (training.globalBatchSize), recomputing gradient accumulation."""

    min_nodes: int = Field(ge=1, le=512)
    """The fewest trainer pods the group may re-form at."""
    max_nodes: int | None = Field(default=None, ge=1, le=512)
    """The most trainer pods it may grow to; resources.nodes when unset. The group starts at resources.nodes."""
    replacement_timeout_seconds: int = Field(default=300, ge=1, le=86400)
    """How long a rank of the group may stay unschedulable (a lost node not replaced) before the group
    re-forms at the largest size that is scheduled, at least minNodes."""
    max_resizes_per_hour: int = Field(default=4, ge=1, le=20)
    """Resizes in any hour at most (shrinks and grows count); a grow waits while the budget is used."""

    cel_rules = (
        CelRule(
            cel="!has(self.maxNodes) || self.minNodes <= self.maxNodes",
            message="minNodes must not exceed maxNodes",
            check=lambda e: e.max_nodes is None or e.min_nodes <= e.max_nodes,
            field_path=".minNodes",
        ),
    )

    def ceiling(self, nodes: int) -> int:
        """The most nodes, for a spec whose resources.nodes is `nodes`."""
        return self.max_nodes if self.max_nodes is not None else nodes


class RunPolicy(ApiModel):
    """Retries, deadlines, clean-up and recovery."""

    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Group restarts tolerated before Failed/BackoffLimitExceeded. A retryable failure of any training pod (or
    a stall) restarts every rank together from the newest complete checkpoint and counts once, however many
    ranks it took down; preemption and node drain (pod condition DisruptionTarget) restart without counting."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Wall-clock limit from the start of training; then Failed/DeadlineExceeded."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Clean up this long after Succeeded or Failed (see ttlPolicy)."""
    ttl_policy: Literal["DeleteChildren", "DeleteSFTJob"] = "DeleteChildren"
    """DeleteChildren keeps the SFTJob (and its status) but deletes its Jobs, pods and Service;
    DeleteSFTJob deletes the SFTJob itself. Artifacts in S3 are never deleted."""
    stuck_pending_timeout_seconds: int = Field(default=600, ge=10)
    """Pods Pending longer than this set the Stuck condition with the cause."""
    fail_when_stuck_seconds: int | None = Field(default=None, ge=10)
    """If set, an SFTJob Stuck this much longer ends Failed/Stuck."""
    collective_timeout_seconds: int = Field(default=300, ge=10, le=86400)
    """Longest a rank waits in one collective (all-reduce, barrier) for its peers before it exits with the
    retryable code: a rank whose peer vanished without closing its connections stops this soon. Must exceed
    the longest legitimate wait (rank 0 writing a checkpoint or downloading the model while others wait)."""
    stall_factor: float = Field(default=10.0, ge=0, le=1000)
    """Hang detection: a step counter that has not advanced for stallFactor x the recent median step time
    (but at least stallFloorSeconds) sets condition Stalled and restarts the group; 0 disables it."""
    stall_floor_seconds: int = Field(default=600, ge=10, le=604800)
    """The shortest time without a new step that counts as a stall (covers checkpoint saves)."""
    elastic: ElasticPolicy | None = None
    """Let the training group re-form at another number of nodes (minNodes to maxNodes); a fixed size when
    unset."""
