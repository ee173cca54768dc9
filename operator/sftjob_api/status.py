"""`SFTJob.status`: what the operator observed. Written only by the operator (status subresource)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from .base import ApiModel
from .evaluation import EvalMetrics
from .tracking import TrackingStatus


class Phase(StrEnum):
    PENDING = "Pending"
    CURATING = "Curating"
    TRAINING = "Training"
    ALIGNING = "Aligning"
    EVALUATING = "Evaluating"
    MERGING = "Merging"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED)


class Reason(StrEnum):
    """status.reason (CamelCase, stable: alerts and dashboards key on them)."""

    INVALID_SPEC = "InvalidSpec"
    NAME_CONFLICT = "NameConflict"  # a child's name is taken by an object this SFTJob does not own
    CREATING = "CreatingChildren"
    QUEUED = "Queued"
    PODS_PENDING = "PodsPending"
    PODS_RUNNING = "PodsRunning"
    RESTARTING = "Restarting"
    FINISHING = "Finishing"
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    CURATE_RUNNING = "CurateRunning"
    EVAL_RUNNING = "EvalRunning"
    MERGE_RUNNING = "MergeRunning"
    SUCCEEDED = "Succeeded"
    CURATE_FAILED = "CurationFailed"
    TRAINING_FAILED = "TrainingFailed"
    ALIGNMENT_FAILED = "AlignmentFailed"
    # the trainer exited SPEC_CHANGED (4): this run's checkpoint was written under another spec fingerprint
    SPEC_CHANGED = "SpecChanged"
    BACKOFF = "BackoffLimitExceeded"
    DEADLINE = "DeadlineExceeded"
    EVAL_FAILED = "EvalFailed"
    GATE_FAILED = "EvalGateFailed"
    MERGE_FAILED = "MergeFailed"
    STUCK = "Stuck"
    # only `sftjob run` (one machine, no Job controller) reports these
    MODEL_NOT_FOUND = "ModelNotFound"
    INTERRUPTED = "Interrupted"


ConditionType = Literal[
    "Created",
    "Curated",
    "Training",
    "Aligned",
    "Evaluated",
    "Merged",
    "Succeeded",
    "Failed",
    "Suspended",
    "Stuck",
    "Stalled",
    "Unschedulable",
]

# status.recoveries keeps this many entries (newest last).
MAX_RECOVERIES = 20


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: ConditionType
    """Condition type."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(default="", max_length=1024)
    """CamelCase machine-readable reason, e.g. TrainingFailed, Unschedulable."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""
    last_transition_time: datetime | None = None
    """When status last changed."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class Progress(ApiModel):
    """Training progress read from the rank-0 trainer's metrics endpoint."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    percent: float | None = None
    """step / totalSteps x 100."""
    summary: str | None = None
    """"step/total (percent%)", shown by kubectl get."""
    epoch: float | None = None
    """Epochs done (fractional)."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: float | None = None
    """Training throughput in real (non-padding) tokens per second, all ranks."""
    eta: str | None = None
    """Estimated time left, e.g. 1h12m."""
    last_update: datetime | None = None
    """When progress was last read."""
    stage: str | None = Field(default=None, max_length=16)
    """The group stage these steps are of: train, or align (spec.alignment); unset: train."""


class DataSummary(ApiModel):
    """The training data as curated (docs/data.md): the full report is train/data_report.json."""

    train_examples: int | None = None
    """Training samples after curation and mixing."""
    content_hash: str | None = None
    """sha256 of the curated token ids and labels: equal hashes, equal training data."""
    reused: bool | None = None
    """Whether another SFTJob curated this data: read from the namespace's cache (<output.uri>/<namespace>/_curated/)
    instead of curated for this run."""
    dropped: dict[str, int] = Field(default_factory=dict)
    """Rows dropped, by reason (duplicate, near_duplicate, contaminated, too_long, ...)."""
    mixture: dict[str, int] = Field(default_factory=dict)
    """Training samples each source gave the mixture."""


class EvalResults(EvalMetrics):
    """Results of the evaluation stage."""

    gates_passed: bool | None = None
    """Whether every configured gate held."""
    failed_gates: list[str] = Field(default_factory=list)
    """Gates that did not hold, e.g. maxEvalLoss: 2.31 > 2.0."""


class ServingHandoff(ApiModel):
    """What to serve for spec.output.serving, and why (docs/serving.md)."""

    server: str = Field(max_length=16)
    """spec.output.serving: vllm, tgi or none."""
    artifact: Literal["adapter", "merged", "model"]
    """adapter: base model + the LoRA adapter; merged: the merged model (the server cannot load the adapter);
    model: the fully fine-tuned model (method full)."""
    uri: str | None = None
    """Where that artifact is."""
    manifest: str | None = None
    """serving/serving.json: base model reference, adapter path, chat template, max length, eval numbers."""
    message: str = Field(default="", max_length=4096)
    """Why the merged model is handed off instead of the adapter (empty when it is not)."""


class Artifacts(ApiModel):
    """Where the run's outputs are."""

    root: str | None = None
    """<output.uri>/<namespace>/<name>/."""
    checkpoints: str | None = None
    """Resumable checkpoints."""
    latest_checkpoint: str | None = None
    """Newest complete checkpoint."""
    adapter: str | None = None
    """The trained LoRA adapter (or full weights for method full)."""
    eval: str | None = None
    """eval/results.json and sample generations."""
    merged: str | None = None
    """The merged model."""
    manifest: str | None = None
    """manifest.json: every file with sha256 and size; written last."""
    serving: ServingHandoff | None = None
    """The serving hand-off: which artifact to serve (spec.output.serving) and its serving manifest."""


# A recovery keeps the ends of at most this many ranks (the cause first, then in the order they ended).
MAX_RANK_ENDS = 16


class RankEnd(ApiModel):
    """How one rank's pod ended (its container's terminated state)."""

    rank: int | None = None
    """The pod's completion index."""
    pod: str = Field(max_length=253)
    """The pod."""
    exit_code: int | None = None
    """The container's exit code."""
    signal: int | None = None
    """The signal that ended the trainer: the container's, or one its log reports (torchrun's "Signal 9
    (SIGKILL) received by PID ...", an exit code 128+N other than 143)."""
    reason: str | None = Field(default=None, max_length=128)
    """The container's reason (OOMKilled, Error) or the pod's (Evicted)."""
    finished_at: datetime | None = None
    """When the container ended (one-second resolution)."""
    consequence: bool = False
    """Whether the end looks like a consequence of another rank's: a collective error (connection
    reset/closed by peer, a collective timeout), or SIGTERM/deletion by the Job controller's teardown."""


class Recovery(ApiModel):
    """One restart of a whole group of ranks (every rank together, from the newest complete checkpoint): the
    training group, or the alignment group (spec.alignment)."""

    time: datetime
    """When the operator tore the group down."""
    cause: str = Field(max_length=1024)
    """What failed: the pod and its exit code or reason, a disruption, or Stalled."""
    counted: bool = True
    """Whether it counted against runPolicy.backoffLimit (disruptions do not)."""
    failed_step: int | None = None
    """The last training step the operator saw before the failure."""
    resumed_from_step: int = 0
    """The newest complete checkpoint the operator saw (0: the group starts from scratch)."""
    steps_lost: int | None = None
    """failedStep - resumedFromStep: training steps that must be done again."""
    downtime_seconds: float | None = None
    """From the failure to the first training step seen after the restart."""
    train_job_uid: str = Field(default="", max_length=64)
    """The torn-down group Job, train or align (each Job attempt is restarted at most once)."""
    stage: str | None = Field(default=None, max_length=16)
    """The group stage restarted: train, or align; unset: train."""
    node: str | None = Field(default=None, max_length=253)
    """The node the failure pointed at (NotReady, gone, or a node-caused eviction): later attempts of this
    run's training group are kept off it (required node anti-affinity). See docs/recovery.md."""
    ranks: list[RankEnd] = Field(default_factory=list, max_length=MAX_RANK_ENDS)
    """How the failed attempt's ranks ended, the cause first (at most 16)."""
    from_world_size: int | None = None
    """A resize (runPolicy.elastic, or resources.nodes/gpusPerNode edited): the world size before."""
    to_world_size: int | None = None
    """A resize: the world size the group re-formed at."""


class Children(ApiModel):
    """Names of the objects the operator created (all owned by the SFTJob)."""

    config_map: str | None = None
    """Trainer config ConfigMap: written by earlier operator versions only (the config now travels in the pod
    template); kept so their statuses still parse."""
    service: str | None = None
    """Headless Service for the training group's rendezvous in a multi-node run (none when resources.nodes is
    1); the alignment group has its own, named like its Job."""
    train_job: str | None = None
    """Indexed training Job."""
    align_job: str | None = None
    """Indexed alignment Job (spec.alignment)."""
    eval_job: str | None = None
    """Evaluation Job."""
    merge_job: str | None = None
    """Merge Job."""


class SFTJobStatus(ApiModel):
    """Observed state of the run."""

    phase: Phase | None = None
    """Pending, Curating, Training, Aligning, Evaluating, Merging, Succeeded, Failed or Suspended."""
    reason: str | None = None
    """Why the phase was entered, e.g. TrainingFailed, EvalGateFailed."""
    message: str | None = None
    """Human-readable summary of the current state."""
    conditions: list[Condition] = Field(default_factory=list)
    """Kubernetes-style conditions."""
    observed_generation: int | None = None
    """metadata.generation last acted upon."""
    start_time: datetime | None = None
    """When the run was accepted."""
    training_start_time: datetime | None = None
    """When the first trainer pod ran."""
    completion_time: datetime | None = None
    """When the run reached Succeeded or Failed."""
    progress: Progress | None = None
    """Progress of the group stage that runs (training, then alignment: progress.stage says which)."""
    data: DataSummary | None = None
    """The curated training data (read from the rank-0 trainer's metrics with the progress)."""
    eval_results: EvalResults | None = None
    """Evaluation stage results."""
    artifacts: Artifacts | None = None
    """Artifact URIs."""
    restarts: int = 0
    """Group restarts counted against runPolicy.backoffLimit (each resumed every rank from a checkpoint)."""
    recoveries: list[Recovery] = Field(default_factory=list, max_length=MAX_RECOVERIES)
    """The latest group restarts, newest last (at most 20)."""
    nodes: int | None = None
    """Trainer pods of the training group (the current one, or the next): resources.nodes, or the size an
    elastic run re-formed at."""
    world_size: int | None = None
    """Ranks of that group: nodes x max(gpusPerNode, 1)."""
    children: Children | None = None
    """Child object names."""
    tracking: TrackingStatus | None = None
    """Where the run is tracked (spec.tracking): the MLflow run id."""
