"""Pure renderers: SFTJob -> one batch/v1 Job per stage (sftjob_api.stage_table: a single-pod stage's Job, or
the indexed Job of a group stage's ranks) and the headless Service of a multi-node run.

No I/O and no clock: the same SFTJob always renders the same objects, so re-creating after an operator
restart is idempotent (names are deterministic; an AlreadyExists answer means "done").

Commands are exec arrays. The only `$(VAR)` references are Kubernetes' own env expansion of variables the
operator defines (or the Job controller injects: JOB_COMPLETION_INDEX); no spec string reaches a shell.
"""

from __future__ import annotations

from sftjob_api import STAGE_TABLE, SFTJobSpec, Stage
from sftjob_api.exit_codes import PERMANENT_CODES
from sftjob_api.stage_table import TRAINER_MODULE, Launch, StageRow, trainer_argv

from .admission import NNODES_ENV, partial_min
from .names import (
    GROUP_SIZE_GATE,
    KUEUE_COMPLETIONS_EQUAL_PARALLELISM,
    KUEUE_MIN_PARALLELISM,
    LABEL_GPUS_PER_NODE,
    LABEL_NODES,
    NNODES_ANNOTATION,
    ChildNames,
    labels,
    owner_reference,
)
from .pod import (
    CONTAINER,
    MASTER_PORT,
    METRICS_PORT,
    TERMINATION_GRACE_SECONDS,
    Obj,
    RenderOptions,
    SFTJobRef,
    pod_template,
)
from .trainer_config import CONFIG_PATH

# Part of this module's interface (the renderers take them; settings and the local runner read them).
__all__ = [
    "METRICS_PORT",
    "TERMINATION_GRACE_SECONDS",
    "RenderOptions",
    "SFTJobRef",
    "child_suspended",
    "needs_service",
    "pod_failure_policy",
    "render_service",
    "render_stage_job",
]


def _meta(ref: SFTJobRef, name: str, stage: str, extra_labels: dict[str, str] | None = None) -> Obj:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": {**labels(ref.name, stage), **(extra_labels or {})},
        "ownerReferences": [owner_reference(ref.name, ref.uid)],
    }


def needs_service(spec: SFTJobSpec) -> bool:
    """Only ranks on other pods need rank 0's DNS name; a one-pod group meets on 127.0.0.1. An elastic run
    that may grow past one node has it from the start."""
    return max(spec.group_sizes(), default=spec.resources.nodes) > 1


def render_service(ref: SFTJobRef, stage: Stage = Stage.TRAIN) -> Obj:
    """The headless Service of a group stage's ranks (train; align with spec.alignment): their subdomain."""
    names = ChildNames(ref.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, names.service_of(stage), stage),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before they are Ready (rendezvous happens first).
            "publishNotReadyAddresses": True,
            "selector": labels(ref.name, stage),
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def pod_failure_policy(group: bool = False) -> Obj:
    """Permanent trainer exit codes fail the Job at once (reason PodFailurePolicy: no retry).

    A single-pod stage (curate, eval, merge): disruptions (preemption, drain) are ignored, every other failure counts
    against the Job's backoffLimit. A group stage (train, align): no Ignore rule, since its Job has backoffLimit
    0 and any failure must fail the Job so that every rank stops together; the operator restarts the group
    and tells a disruption (not counted) from a crash by the failed pod's DisruptionTarget condition.
    """
    rules: list[Obj] = [
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": CONTAINER,
                "operator": "In",
                "values": [int(c) for c in PERMANENT_CODES],
            },
        },
    ]
    if not group:
        rules.append(
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        )
    return {"rules": rules}


def _job(
    ref: SFTJobRef, spec: SFTJobSpec, row: StageRow, template: Obj, completions: int, backoff_limit: int
) -> Obj:
    job_spec: Obj = {
        "completions": completions,
        "parallelism": completions,
        "completionMode": "Indexed" if row.group else "NonIndexed",
        "backoffLimit": backoff_limit,
        "podFailurePolicy": pod_failure_policy(group=row.group),
        # A replacement pod starts only once the failed one is gone: two rank-0s never race on a checkpoint.
        "podReplacementPolicy": "Failed",
        "suspend": child_suspended(ref, spec),
        "manualSelector": False,
        "template": template,
    }
    deadline = spec.run_policy.active_deadline_seconds
    if deadline is not None and row.group:
        job_spec["activeDeadlineSeconds"] = deadline
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(ref, ChildNames(ref.name).job(row.stage), row.stage, ref.kueue_labels),
        "spec": job_spec,
    }


def child_suspended(ref: SFTJobRef, spec: SFTJobSpec) -> bool:
    """A child Job starts suspended when the user suspended the run or when Kueue must admit it."""
    return spec.suspend or ref.queued


def _command(row: StageRow, launch: Launch | None = None) -> list[str]:
    return [*TRAINER_MODULE, *trainer_argv(row.stage, CONFIG_PATH, launch)]


def _single_pod_job(row: StageRow, ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    """One pod (curate, eval, merge): the Job controller retries it (at most 2 times) after a crash."""
    template = pod_template(ref, spec, opts, row, _command(row))
    return _job(ref, spec, row, template, 1, min(spec.run_policy.backoff_limit, 2))


def _group_job(row: StageRow, ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    """One pod per node, each running max(gpusPerNode, 1) ranks under torchrun; rank 0's pod is the
    rendezvous (`<job>-0.<service>`, or 127.0.0.1 on one node). `spec` is at the group's size
    (render/elastic.py: spec_at)."""
    names = ChildNames(ref.name)
    res = spec.resources
    # An elastic group under Kueue: Kueue picks the size, the operator tells each pod (render/admission.py).
    least = partial_min(spec, ref.queued, row.stage, res.nodes)
    launch = Launch(
        nnodes=res.nodes if least is None else f"$({NNODES_ENV})",
        nproc_per_node=max(res.gpus_per_node, 1),
        node_rank="$(JOB_COMPLETION_INDEX)",
        master_addr="$(MASTER_ADDR)",
        master_port="$(MASTER_PORT)",
    )
    multi_node = res.nodes > 1
    extra_env: list[Obj] = [
        {"name": "MASTER_ADDR", "value": names.master_addr_of(row.stage) if multi_node else "127.0.0.1"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        # Also injected by the Job controller; defined here so $(JOB_COMPLETION_INDEX) always expands.
        _annotation_env("JOB_COMPLETION_INDEX", "batch.kubernetes.io/job-completion-index"),
    ]
    if least is not None:
        extra_env.append(_annotation_env(NNODES_ENV, NNODES_ANNOTATION))
    subdomain = names.service_of(row.stage) if multi_node else None
    template = pod_template(ref, spec, opts, row, _command(row, launch), extra_env, subdomain)
    # backoffLimit 0: the first failed rank fails the Job, whose controller then stops the other ranks at once;
    # the operator restarts the whole group (render/recovery.py) and counts against runPolicy.backoffLimit.
    job = _job(ref, spec, row, template, res.nodes, 0)
    # The shape it runs at, for render/elastic.py to compare with the wanted one.
    job["metadata"]["labels"].update(
        {LABEL_NODES: str(res.nodes), LABEL_GPUS_PER_NODE: str(res.gpus_per_node)}
    )
    if least is not None:
        job["metadata"]["annotations"] = {
            KUEUE_MIN_PARALLELISM: str(least),
            KUEUE_COMPLETIONS_EQUAL_PARALLELISM: "true",
        }
        template["spec"]["schedulingGates"] = [{"name": GROUP_SIZE_GATE}]
    return job


def _annotation_env(name: str, annotation: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}}


def render_stage_job(stage: Stage, ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    """The Job of `stage`, as its row in sftjob_api.stage_table says: a group of ranks or one pod."""
    row = STAGE_TABLE[stage]
    return (_group_job if row.group else _single_pod_job)(row, ref, spec, opts)
