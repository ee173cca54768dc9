"""The pod every stage Job runs: the trainer container, its environment, resources and security context, and
the operator-wide inputs to rendering (RenderOptions, SFTJobRef). Pure, like the rest of render/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftjob_api import SFTJobSpec
from sftjob_api.resources_spec import ResourcesSpec
from sftjob_api.stage_table import StageRow
from sftjob_api.trainer_config import RUN_ID_ENV

from .bad_nodes import with_avoided_nodes
from .names import KUEUE_LABELS, labels
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


def pod_template(
    ref: SFTJobRef,
    spec: SFTJobSpec,
    opts: RenderOptions,
    row: StageRow,
    command: list[str],
    extra_env: list[Obj] | None = None,
    subdomain: str | None = None,
) -> Obj:
    """The pod of one stage: the trainer container with the config file, its env, resources (the row's GPUs)
    and the locked-down security context. A group stage's pods also listen for the rendezvous and are kept
    off the nodes a recovery named (ref.avoid_nodes)."""
    res = spec.resources
    pod_labels = {**res.pod_labels, **ref.kueue_labels, **labels(ref.name, row.stage)}
    container: Obj = {
        "name": CONTAINER,
        "image": res.image or opts.default_image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": command,
        # the run's identity (checkpoint prefix and marker; sftjob_api.trainer_config.RUN_ID_ENV)
        "env": _env(spec, opts) + [{"name": RUN_ID_ENV, "value": ref.uid}] + (extra_env or []),
        "ports": [{"name": "metrics", "containerPort": opts.metrics_port, "protocol": "TCP"}],
        "resources": _resources(res, row.gpus(spec)),
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
    if row.group:
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
    affinity = with_avoided_nodes(own, ref.avoid_nodes if row.group else ())
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
