"""What the reconcile works from: slim copies of watched objects (kopf's indexes keep these) and the
per-SFTJob memory of this process."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sftjob_api.scheduling import split_child_only

from ..render.names import COMPLETION_INDEX_LABEL, KUEUE_MIN_PARALLELISM
from ..render.recovery import StepClock

Obj = dict[str, Any]


@dataclass
class Snapshot:
    """Child Jobs and Pods of one SFTJob, copied out of kopf's indexes on the event loop."""

    jobs: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)


def slim_job(body: Any) -> Obj:
    """What the index keeps of a child Job (small: 200+ SFTJobs fit in little memory)."""
    meta = body.get("metadata", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [dict(o) for o in meta.get("ownerReferences") or []],
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "annotations": {
                k: v for k, v in (meta.get("annotations") or {}).items() if k == KUEUE_MIN_PARALLELISM
            },
        },
        "spec": {
            "suspend": body.get("spec", {}).get("suspend"),
            "completions": body.get("spec", {}).get("completions"),
            "parallelism": body.get("spec", {}).get("parallelism"),
        },
        "status": json.loads(json.dumps(dict(body.get("status") or {}))),
    }


# Set on a slim SFTJob whose spec lost its child-only fields (split_child_only): the digest of what they held.
CHILD_ONLY_DIGEST = "childOnlyDigest"


def slim_sftjob(body: Any) -> Obj:
    """The SFTJob as last seen by the watch: reconciles start from it instead of a GET (a stale copy is caught
    by the resourceVersion precondition of the status patch, and then re-read). Without tolerations and
    affinity: a child Job's create reads them from the API (`Reconciler._full_spec`)."""
    meta = body.get("metadata", {})
    spec, digest = split_child_only(body.get("spec") or {})
    out = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: json.loads(json.dumps(meta.get(k)))
            for k in (
                "name",
                "namespace",
                "uid",
                "generation",
                "resourceVersion",
                "labels",
                "creationTimestamp",
                "deletionTimestamp",
            )
            if meta.get(k) is not None
        },
        "spec": spec,
        "status": json.loads(json.dumps(dict(body.get("status") or {}))),
    }
    if digest is not None:
        out[CHILD_ONLY_DIGEST] = digest
    return out


def slim_pod(body: Any) -> Obj:
    meta = body.get("metadata", {})
    status = body.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {
                k: v for k, v in (meta.get("annotations") or {}).items() if k == COMPLETION_INDEX_LABEL
            },
            "ownerReferences": [dict(o) for o in meta.get("ownerReferences") or []],
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {
            "nodeName": (body.get("spec") or {}).get("nodeName"),
            "schedulingGates": [
                {"name": g.get("name")} for g in (body.get("spec") or {}).get("schedulingGates") or []
            ],
        },
        "status": {
            "phase": status.get("phase"),
            "reason": status.get("reason"),
            "podIP": status.get("podIP"),
            "conditions": [
                dict(c)
                for c in status.get("conditions") or []
                if c.get("type") in ("PodScheduled", "DisruptionTarget")
            ],
            "containerStatuses": json.loads(json.dumps(list(status.get("containerStatuses") or []))),
        },
    }


@dataclass
class Memo:
    """Per-SFTJob memory of this process (lost on restart, rebuilt from the cluster)."""

    created: dict[str, float] = field(default_factory=dict)  # child key -> monotonic time of create
    # child Job name -> (spec.suspend we wrote, monotonic time): our own writes, until the watch shows them
    suspended: dict[str, tuple[bool, float]] = field(default_factory=dict)
    last_progress_write: float = 0.0
    # (resourceVersion a status write started from, the SFTJob it returned): until the watch shows the write
    own_write: tuple[str, Obj] | None = None
    ttl_done: bool = False
    # Kueue's partial admission: (train Job uid, the size label we wrote), until the watch shows it
    # (render/admission.py): one label write and one Event per admission
    sized: tuple[str, int] | None = None
    # Kueue: child Job name -> (its uid, the Workload spec.active we wrote) (handlers/kueue.py)
    workload_active: dict[str, tuple[str, bool]] = field(default_factory=dict)
    steps: StepClock = field(default_factory=StepClock)  # hang detection: when each step was first seen
    # Elastic runs: the checkpoint step when the capacity probe first found spare nodes (render/elastic.py)
    capacity_since_step: int | None = None
    grow_held: bool = False  # the Event ResizeHeld was posted for the grow that waits now
