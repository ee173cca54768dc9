"""The stages of a run as data: one row per stage, the one place the operator (its renderers and phase
machine), `sftjob run` and the `sftjob` CLI learn what a stage is.

A stage is one entry point of the trainer (`python -m sftjob_trainer <stage> --config FILE`, the stage's
name) run as a child Job: one pod, or, for a `group` stage, an indexed group of pods whose ranks meet under
torchrun (`... launch [torchrun args] <stage> --config FILE`). While its Job runs the run is in the row's
phase with its running reason; when the Job fails the run ends Failed with its failed reason; the row's
condition records it. Kueue's GenericJob is the model: the readers are written once against the row, so a
new stage is a new row (plus its trainer entry point), never another copy of a renderer or a reason map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from .exit_codes import ExitCode
from .spec import SFTJobSpec
from .status import ConditionType, Phase, Reason


class Stage(StrEnum):
    """A stage's name: its trainer entry point, its Job's name suffix and the pods' stage label."""

    CURATE = "curate"
    TRAIN = "train"
    ALIGN = "align"
    EVAL = "eval"
    MERGE = "merge"


def _no_gpu(spec: SFTJobSpec) -> int:
    return 0


def _one_gpu(spec: SFTJobSpec) -> int:
    return min(spec.resources.gpus_per_node, 1)


def _node_gpus(spec: SFTJobSpec) -> int:
    return spec.resources.gpus_per_node


def _scoring_gpu(spec: SFTJobSpec) -> int:
    """Curation needs a GPU only when the perplexity filter scores rows with the base model."""
    curation = spec.dataset.curation
    return _one_gpu(spec) if curation is not None and curation.perplexity is not None else 0


def merge_enabled(spec: SFTJobSpec) -> bool:
    """Merging folds an adapter into the base model: nothing to merge for method full."""
    return spec.merge.enabled and spec.method.type != "full"


def curate_enabled(spec: SFTJobSpec) -> bool:
    """A curate stage (its own Job, no GPU unless the perplexity filter scores) runs before training when
    spec.dataset.curation is set: near-duplicate search, decontamination and scoring happen once, before any
    training GPU is held, and the training ranks read only their own shards of the result."""
    return spec.dataset.curation is not None


@dataclass(frozen=True)
class StageRow:
    stage: Stage
    enabled: Callable[[SFTJobSpec], bool]  # whether a spec runs it
    phase: Phase  # status.phase while its Job runs
    running: Reason  # status.reason while it runs (a group's pods: the phase machine says more)
    failed: Reason  # status.reason when its Job fails
    condition: ConditionType  # the condition that records the stage
    group: bool  # an indexed group of ranks under torchrun, one pod per node (else: one pod)
    gpus: Callable[[SFTJobSpec], int]  # GPUs of each of its pods
    noun: str  # in messages: "the <noun> Job"
    doing: str  # status.message while its one pod runs
    # status.message when its Job is created / when spec.suspend holds the run before its Job exists.
    # "{previous}": the noun of the stage that completed just before it in this run (`starting_in`).
    starting: str
    waiting: str
    done: tuple[str, str]  # the condition's (reason, message) once its Job completed
    disabled: str | None = None  # the condition's message when the spec skips the stage (None: absent)
    # The run shows Pending (CreatingChildren) while its Job is created: the first stages, whose pods wait
    # for the scheduler (and for Kueue) before anything runs. Later stages go straight into their phase.
    starts_pending: bool = False
    # Trainer exit codes (sftjob_api.exit_codes) that end the run with a reason of their own, not `failed`.
    exit_reasons: Mapping[ExitCode, Reason] = field(default_factory=dict)
    also_failed: tuple[Reason, ...] = ()  # more Failed reasons that name this stage (the Job's own ends)

    @property
    def failed_reasons(self) -> tuple[Reason, ...]:
        return (self.failed, *self.exit_reasons.values(), *self.also_failed)

    def starting_in(self, run: Sequence[Stage]) -> str:
        """`starting` in a run of these stages (the spec's `stages`)."""
        return self.starting.format(previous=_previous_noun(run, self.stage))

    def waiting_in(self, run: Sequence[Stage]) -> str:
        """`waiting` in a run of these stages (the spec's `stages`)."""
        return self.waiting.format(previous=_previous_noun(run, self.stage))

    def failure_reason(self, exit_code: int) -> Reason:
        """The Failed reason when the stage's trainer exited with `exit_code` (non-zero)."""
        return next((r for c, r in self.exit_reasons.items() if c == exit_code), self.failed)


# In run order. `stages(spec)` picks the rows a spec runs.
STAGE_TABLE: dict[Stage, StageRow] = {
    row.stage: row
    for row in (
        StageRow(
            Stage.CURATE,
            enabled=curate_enabled,
            phase=Phase.CURATING,
            running=Reason.CURATE_RUNNING,
            failed=Reason.CURATE_FAILED,
            condition="Curated",
            group=False,
            gpus=_scoring_gpu,
            noun="curation",
            doing="curating the training data",
            starting="creating the curation Job",
            waiting="spec.suspend is true; nothing is running",
            done=("CurationCompleted", "curation Job completed"),
            starts_pending=True,
        ),
        StageRow(
            Stage.TRAIN,
            enabled=lambda spec: True,
            phase=Phase.TRAINING,
            running=Reason.PODS_RUNNING,
            failed=Reason.TRAINING_FAILED,
            condition="Training",
            group=True,
            gpus=_node_gpus,
            noun="training",
            doing="training",
            starting="creating the training Job",
            waiting="spec.suspend is true; nothing is running",
            done=("TrainingCompleted", "training Job completed"),
            starts_pending=True,
            # resuming would mix two runs' training inputs (docs/recovery.md, "Checkpoints and run identity")
            exit_reasons={ExitCode.SPEC_CHANGED: Reason.SPEC_CHANGED},
            also_failed=(Reason.BACKOFF, Reason.DEADLINE),
        ),
        StageRow(
            Stage.ALIGN,
            enabled=lambda spec: spec.alignment is not None,
            phase=Phase.ALIGNING,
            running=Reason.PODS_RUNNING,
            failed=Reason.ALIGNMENT_FAILED,
            condition="Aligned",
            group=True,
            gpus=_node_gpus,
            noun="alignment",
            doing="aligning the model to the preference pairs",
            starting="{previous} complete; creating the alignment Job",
            waiting="{previous} done; alignment waits for spec.suspend",
            done=("AlignmentCompleted", "alignment Job completed"),
        ),
        StageRow(
            Stage.EVAL,
            enabled=lambda spec: spec.eval.enabled,
            phase=Phase.EVALUATING,
            running=Reason.EVAL_RUNNING,
            failed=Reason.EVAL_FAILED,
            condition="Evaluated",
            group=False,
            gpus=_one_gpu,
            noun="evaluation",
            doing="evaluating the adapter on held-out data",
            # after training, or after alignment when the spec aligns
            starting="{previous} complete; starting evaluation",
            waiting="{previous} done; evaluation waits for spec.suspend",
            done=("EvalPassed", "evaluation completed"),
            disabled="spec.eval.enabled is false",
            exit_reasons={ExitCode.EVAL_GATE_FAILED: Reason.GATE_FAILED},
        ),
        StageRow(
            Stage.MERGE,
            enabled=merge_enabled,
            phase=Phase.MERGING,
            running=Reason.MERGE_RUNNING,
            failed=Reason.MERGE_FAILED,
            condition="Merged",
            group=False,
            # Merging needs host memory, not a GPU (DeepSpeed cannot merge; peft's merge_and_unload runs
            # on CPU).
            gpus=_no_gpu,
            noun="merge",
            doing="merging the adapter into the base model",
            starting="merging the adapter into the base model",
            waiting="merge waits for spec.suspend",
            done=("MergeCompleted", "merged model written"),
            disabled="merge disabled (spec.merge.enabled false or method full)",
        ),
    )
}


def _previous_noun(run: Sequence[Stage], stage: Stage) -> str:
    """The noun of the stage before `stage` in `run` ("" for the first)."""
    i = list(run).index(stage)
    return STAGE_TABLE[run[i - 1]].noun if i else ""


def stage_of_phase(phase: str) -> Stage | None:
    """The stage whose Job runs while the run is in `phase` (None: no stage's own phase)."""
    return next((row.stage for row in STAGE_TABLE.values() if row.phase == phase), None)


def stage_of_failure(reason: str) -> Stage | None:
    """The stage a Failed reason names (None: a reason of the run as a whole, e.g. InvalidSpec)."""
    return next((row.stage for row in STAGE_TABLE.values() if reason in row.failed_reasons), None)


# ---- the trainer's command line -------------------------------------------------------------------------

TRAINER_MODULE = ("python", "-m", "sftjob_trainer")


@dataclass(frozen=True)
class Launch:
    """Where a group stage's ranks meet: torchrun's arguments (strings: a Job passes `$(VAR)` references
    that Kubernetes expands, `sftjob run` the values)."""

    nnodes: int | str  # a str: a `$(VAR)` the pod's env resolves (a Kueue-sized group: render/admission.py)
    nproc_per_node: int
    master_addr: str
    master_port: str
    node_rank: str | None = None  # None: torchrun's default (one node)


def trainer_argv(stage: Stage, config_path: str, launch: Launch | None = None) -> list[str]:
    """The arguments after `python -m sftjob_trainer` that run `stage`. A group stage runs under `launch`,
    which runs torchrun and restores the worker's real exit code (torchrun reports any failed worker as 1,
    which would turn a permanent error into a retry)."""
    args = [str(stage), "--config", config_path]
    group = STAGE_TABLE[stage].group
    if group != (launch is not None):
        raise ValueError(f"stage {stage}: a launch is {'required' if group else 'not expected'}")
    if launch is None:
        return args
    rank = [f"--node-rank={launch.node_rank}"] if launch.node_rank is not None else []
    return [
        "launch",
        f"--nnodes={launch.nnodes}",
        f"--nproc-per-node={launch.nproc_per_node}",
        *rank,
        f"--master-addr={launch.master_addr}",
        f"--master-port={launch.master_port}",
        *args,
    ]


# ---- which stages a spec runs ---------------------------------------------------------------------------


def stages(spec: SFTJobSpec) -> tuple[Stage, ...]:
    """The stages this spec runs, in order. The operator's phase machine, `sftjob run` and the trainer (the
    last stage writes manifest.json) all follow this list."""
    return tuple(row.stage for row in STAGE_TABLE.values() if row.enabled(spec))


def final_stage(spec: SFTJobSpec) -> Stage:
    return stages(spec)[-1]
