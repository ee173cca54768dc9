"""Pure renderers: SFTJob -> curate Job, indexed train Job, eval Job, merge Job, and the headless Service of a
multi-node run.

No I/O and no clock: the same SFTJob always renders the same objects, so re-creating after an operator
restart is idempotent (names are deterministic; an AlreadyExists answer means "done").

Commands are exec arrays. The only `$(VAR)` references are Kubernetes' own env expansion of variables the
operator defines (or the Job controller injects: JOB_COMPLETION_INDEX); no spec string reaches a shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftjob_api import SFTJobSpec, Stage
from sftjob_api.exit_codes import PERMANENT_CODES
from sftjob_api.spec import ResourcesSpec
from sftjob_api.trainer_config import RUN_ID_ENV

from .bad_nodes import with_avoided_nodes
from .names import KUEUE_LABELS, LABEL_GPUS_PER_NODE, LABEL_NODES, ChildNames, labels, owner_reference
from .trainer_config import (
    CONFIG_ANNOTATION,
    CONFIG_DIR,
    CONFIG_PATH,
    PVC_MOUNT_ROOT,
    config_volume,
    pvc_claims,
    render_config_file,
)

Obj = dict[str, Any]

CONTAINER = "trainer"
METRICS_PORT = 9400
MASTER_PORT = 29500
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
RUN_AS_USER = 1000
# The root filesystem is read-only: $HOME (caches of HF, triton, torch) and /tmp (the trainer's work dir, the
# torch extension cache) are emptyDirs of their own.
HOME_DIR = "/home/trainer"
# Long enough for the trainer to write a checkpoint on SIGTERM (suspend, preemption, node drain).
TERMINATION_GRACE_SECONDS = 300


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide inputs to rendering."""

    default_image: str = "ghcr.io/sftjob/trainer:0.1.0"
    metrics_port: int = METRICS_PORT
    image_pull_policy: str = "IfNotPresent"
    default_service_account: str | None = None


@dataclass(frozen=True)
class SFTJobRef:
    """The parts of the SFTJob object the renderers need besides its spec."""

    name: str
    namespace: str
    uid: str
    labels: tuple[tuple[str, str], ...] = ()
    # Nodes the train Job's pods are kept off (render/bad_nodes.py: the nodes named by status.recoveries).
    avoid_nodes: tuple[str, ...] = ()

    @property
    def kueue_labels(self) -> dict[str, str]:
        return {k: v for k, v in self.labels if k in KUEUE_LABELS}

    @property
    def queued(self) -> bool:
        """Kueue manages admission: child Jobs are created suspended and Kueue unsuspends them."""
        return any(k == KUEUE_LABELS[0] for k, _ in self.labels)


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


def render_service(ref: SFTJobRef) -> Obj:
    names = ChildNames(ref.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, names.service, Stage.TRAIN),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before they are Ready (rendezvous happens first).
            "publishNotReadyAddresses": True,
            "selector": labels(ref.name, Stage.TRAIN),
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def omp_threads(cpu: str | None, procs_per_pod: int) -> int | None:
    """Threads per rank for the pod's CPU limit. torch sizes its pool by the host's cores, not the cgroup's
    quota: a rank limited to 900m on a 16-core node would run 16 threads and be throttled most of each
    period. None when the pod has no CPU limit (or a quantity that is no CPU amount)."""
    if cpu is None:
        return None
    if cpu.endswith("m") and cpu[:-1].isdigit():
        cores = int(cpu[:-1]) / 1000
    else:
        try:
            cores = float(cpu)
        except ValueError:
            return None
    return max(1, int(cores // procs_per_pod))


def _env(spec: SFTJobSpec, opts: RenderOptions) -> list[Obj]:
    """Only what Kubernetes must inject: everything else is in the config file (spec.output included)."""
    env: list[Obj] = [
        {"name": "SFTJOB_CONFIG", "value": CONFIG_PATH},
        {"name": "SFTJOB_METRICS_PORT", "value": str(opts.metrics_port)},
        {"name": "SFTJOB_TERMINATION_LOG", "value": TERMINATION_MESSAGE_PATH},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": HOME_DIR},
        # the working directory ($HOME) is writable: keep it off Python's import path
        {"name": "PYTHONSAFEPATH", "value": "1"},
    ]
    if spec.resources.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    threads = omp_threads(spec.resources.cpu, max(1, spec.resources.gpus_per_node))
    if threads is not None:
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    sec = spec.output.credentials_secret
    if sec is not None:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", sec.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", sec.secret_access_key_key),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": sec.name, "key": key}}})
    mlflow = spec.tracking.mlflow if spec.tracking else None
    if mlflow is not None and mlflow.credentials_secret is not None:
        creds = mlflow.credentials_secret  # basic auth and/or a token: the keys the Secret lacks stay unset
        for var, key in creds.env_keys():
            ref = {"name": creds.name, "key": key, "optional": True}
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return env


def _resources(res: ResourcesSpec, gpus: int) -> Obj:
    quantities: dict[str, str] = {}
    if res.cpu:
        quantities["cpu"] = res.cpu
    if res.memory:
        quantities["memory"] = res.memory
    if gpus > 0:
        quantities["nvidia.com/gpu"] = str(gpus)
    if not quantities:
        return {}
    # Requests == limits: Guaranteed QoS for the trainer; GPUs must be in limits anyway.
    return {"requests": dict(quantities), "limits": dict(quantities)}


def _container_security() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_template(
    ref: SFTJobRef,
    spec: SFTJobSpec,
    opts: RenderOptions,
    stage: Stage,
    command: list[str],
    gpus: int,
    extra_env: list[Obj] | None = None,
    subdomain: str | None = None,
) -> Obj:
    res = spec.resources
    pod_labels = {**res.pod_labels, **ref.kueue_labels, **labels(ref.name, stage)}
    container: Obj = {
        "name": CONTAINER,
        "image": res.image or opts.default_image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": command,
        # the run's identity (checkpoint prefix and marker; sftjob_api.trainer_config.RUN_ID_ENV)
        "env": _env(spec, opts) + [{"name": RUN_ID_ENV, "value": ref.uid}] + (extra_env or []),
        "ports": [{"name": "metrics", "containerPort": opts.metrics_port, "protocol": "TCP"}],
        "resources": _resources(res, gpus),
        "securityContext": _container_security(),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/tmp"},
            {"name": "home", "mountPath": HOME_DIR},
        ],
    }
    volumes: list[Obj] = []
    for i, claim in enumerate(pvc_claims(spec)):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        container["volumeMounts"].append(
            {"name": f"pvc-{i}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True}
        )
    if stage == Stage.TRAIN:
        container["ports"].append({"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"})
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            config_volume("config"),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "home", "emptyDir": {}},
            *volumes,
        ],
    }
    if subdomain:
        pod_spec["subdomain"] = subdomain
    if res.service_account_name or opts.default_service_account:
        pod_spec["serviceAccountName"] = res.service_account_name or opts.default_service_account
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.model_dump(mode="json", exclude_none=True) for t in res.tolerations]
    own = res.affinity.model_dump(mode="json", exclude_none=True) if res.affinity else None
    affinity = with_avoided_nodes(own, ref.avoid_nodes if stage == Stage.TRAIN else ())
    if affinity:
        pod_spec["affinity"] = affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    return {
        "metadata": {
            "labels": pod_labels,
            "annotations": {
                **res.pod_annotations,
                CONFIG_ANNOTATION: render_config_file(ref.namespace, ref.name, spec),
            },
        },
        "spec": pod_spec,
    }


def pod_failure_policy(group: bool = False) -> Obj:
    """Permanent trainer exit codes fail the Job at once (reason PodFailurePolicy: no retry).

    Curate, eval and merge (one pod): disruptions (preemption, drain) are ignored, every other failure counts
    against the Job's backoffLimit. The train group (`group`): no Ignore rule, since its Job has backoffLimit
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
    ref: SFTJobRef,
    spec: SFTJobSpec,
    stage: Stage,
    template: Obj,
    completions: int,
    backoff_limit: int,
    suspend: bool,
    indexed: bool,
) -> Obj:
    job_spec: Obj = {
        "completions": completions,
        "parallelism": completions,
        "completionMode": "Indexed" if indexed else "NonIndexed",
        "backoffLimit": backoff_limit,
        "podFailurePolicy": pod_failure_policy(group=stage == Stage.TRAIN),
        # A replacement pod starts only once the failed one is gone: two rank-0s never race on a checkpoint.
        "podReplacementPolicy": "Failed",
        "suspend": suspend,
        "manualSelector": False,
        "template": template,
    }
    deadline = spec.run_policy.active_deadline_seconds
    if deadline is not None and stage == Stage.TRAIN:
        job_spec["activeDeadlineSeconds"] = deadline
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(ref, ChildNames(ref.name).job(stage), stage, ref.kueue_labels),
        "spec": job_spec,
    }


def child_suspended(ref: SFTJobRef, spec: SFTJobSpec) -> bool:
    """A child Job starts suspended when the user suspended the run or when Kueue must admit it."""
    return spec.suspend or ref.queued


def render_curate_job(ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    """One pod that curates and tokenizes the data and cuts the per-rank shards before the train Job exists.
    No GPU, except one (at most gpusPerNode) when the perplexity filter scores rows with the base model."""
    command = ["python", "-m", "sftjob_trainer", "curate", "--config", CONFIG_PATH]
    curation = spec.dataset.curation
    scores = curation is not None and curation.perplexity is not None
    gpus = min(spec.resources.gpus_per_node, 1) if scores else 0
    template = _pod_template(ref, spec, opts, Stage.CURATE, command, gpus)
    return _job(
        ref,
        spec,
        Stage.CURATE,
        template,
        1,
        min(spec.run_policy.backoff_limit, 2),
        child_suspended(ref, spec),
        False,
    )


def render_train_job(ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    names = ChildNames(ref.name)
    res = spec.resources
    nprocs = max(res.gpus_per_node, 1)
    # `launch` runs torchrun (python -m torch.distributed.run) and restores the worker's real exit code
    # (torchrun reports any failed worker as 1, which would turn a permanent error into a retry).
    command = [
        "python",
        "-m",
        "sftjob_trainer",
        "launch",
        f"--nnodes={res.nodes}",
        f"--nproc-per-node={nprocs}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "train",
        "--config",
        CONFIG_PATH,
    ]
    multi_node = res.nodes > 1  # `spec` is at the group's size (render/elastic.py: spec_at)
    extra_env: list[Obj] = [
        {"name": "MASTER_ADDR", "value": names.master_addr if multi_node else "127.0.0.1"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        # Also injected by the Job controller; defined here so $(JOB_COMPLETION_INDEX) always expands.
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
    ]
    subdomain = names.service if multi_node else None
    template = _pod_template(ref, spec, opts, Stage.TRAIN, command, res.gpus_per_node, extra_env, subdomain)
    # backoffLimit 0: the first failed rank fails the Job, whose controller then stops the other ranks at once;
    # the operator restarts the whole group (render/recovery.py) and counts against runPolicy.backoffLimit.
    backoff = 0
    job = _job(ref, spec, Stage.TRAIN, template, res.nodes, backoff, child_suspended(ref, spec), True)
    # The shape it runs at, for render/elastic.py to compare with the wanted one.
    job["metadata"]["labels"].update(
        {LABEL_NODES: str(res.nodes), LABEL_GPUS_PER_NODE: str(res.gpus_per_node)}
    )
    return job


def render_eval_job(ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    command = ["python", "-m", "sftjob_trainer", "eval", "--config", CONFIG_PATH]
    gpus = min(spec.resources.gpus_per_node, 1)
    template = _pod_template(ref, spec, opts, Stage.EVAL, command, gpus)
    return _job(
        ref,
        spec,
        Stage.EVAL,
        template,
        1,
        min(spec.run_policy.backoff_limit, 2),
        child_suspended(ref, spec),
        False,
    )


def render_merge_job(ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    # Merging needs host memory, not a GPU (DeepSpeed cannot merge; peft's merge_and_unload runs on CPU).
    command = ["python", "-m", "sftjob_trainer", "merge", "--config", CONFIG_PATH]
    template = _pod_template(ref, spec, opts, Stage.MERGE, command, 0)
    return _job(
        ref,
        spec,
        Stage.MERGE,
        template,
        1,
        min(spec.run_policy.backoff_limit, 2),
        child_suspended(ref, spec),
        False,
    )


def render_stage_job(stage: Stage, ref: SFTJobRef, spec: SFTJobSpec, opts: RenderOptions) -> Obj:
    renderer = {
        Stage.CURATE: render_curate_job,
        Stage.TRAIN: render_train_job,
        Stage.EVAL: render_eval_job,
        Stage.MERGE: render_merge_job,
    }
    return renderer[stage](ref, spec, opts)
