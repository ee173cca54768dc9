"""Avoiding the bad node (pure): which failures point at a node, which nodes a run's training group is kept
off, and the required node anti-affinity that does it. See docs/recovery.md, "Avoiding the bad node".

A failure points at the node when a training pod's node is gone, or NotReady and tainted for eviction by
Kubernetes' node lifecycle controller, while the pod runs (the operator reads the nodes of the running ranks
at its progress interval), when a pod was deleted because of its node (DisruptionTarget reasons of the taint
manager, the pod GC, the kubelet's node-pressure eviction or graceful node shutdown), or when the pod failed
with a node reason (Evicted, NodeLost, NodeShutdown).
Each recovery records that node (`status.recoveries[].node`); every later attempt of this run's train Job
carries a `NotIn` on `kubernetes.io/hostname` for the nodes named there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import deepcopy
from typing import Any

from sftjob_api.status import Recovery

from .observe import PodObs

HOSTNAME_LABEL = "kubernetes.io/hostname"
# DisruptionTarget reasons that blame the node, not the scheduler or an API eviction (drain): the taint
# manager (NoExecute not-ready/unreachable taints), the pod GC (node gone; out-of-service taint) and the
# kubelet (node-pressure eviction, graceful node shutdown).
NODE_DISRUPTIONS = ("DeletionByTaintManager", "DeletionByPodGC", "TerminationByKubelet")
# A failed pod's status.reason that blames its node.
NODE_POD_REASONS = ("Evicted", "NodeLost", "NodeShutdown", "Terminated")
# At most this many nodes are avoided (the newest): a run must not exclude a whole small pool by itself.
MAX_AVOIDED_NODES = 8


# The NoExecute taints Kubernetes' node lifecycle controller puts on a NotReady node whose pods it means to
# evict. It holds them back, and lifts those already set, when every node is NotReady at once (its "full
# disruption" mode: a control-plane or network outage, not node failures); NotReady alone is not enough.
EVICTION_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


def node_problem(node: Mapping[str, Any] | None) -> str | None:
    """A Node object (None: it does not exist) -> why no rank should run there now; None when it is Ready,
    or NotReady without the node lifecycle controller's eviction taint (e.g. every node briefly NotReady
    after the apiserver was away: their heartbeats could not reach it)."""
    if node is None:
        return "gone"
    taints = (node.get("spec") or {}).get("taints") or []
    if not any(t.get("key") in EVICTION_TAINTS and t.get("effect") == "NoExecute" for t in taints):
        return None
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            if cond.get("status") == "True":
                return None
            return f"NotReady ({cond.get('reason') or cond.get('status')})"
    return "NotReady (no Ready condition)"


def blamed_node(pod: PodObs) -> str | None:
    """The pod's node when the pod's own failure or disruption blames it."""
    if not pod.node:
        return None
    if pod.disruption and pod.disruption.split(":", 1)[0] in NODE_DISRUPTIONS:
        return pod.node
    if pod.phase == "Failed" and pod.reason in NODE_POD_REASONS:
        return pod.node
    return None


def down_under(pods: Iterable[PodObs], problems: Mapping[str, str]) -> tuple[PodObs, str] | None:
    """The first live rank (lowest index) whose node has a problem, and that problem."""
    live = sorted(
        (p for p in pods if p.node in problems and p.phase in ("Pending", "Running") and not p.deleting),
        key=lambda p: (p.index or 0, p.name),
    )
    return (live[0], problems[str(live[0].node)]) if live else None


def avoided_nodes(recoveries: Iterable[Recovery]) -> tuple[str, ...]:
    """The nodes this run's training group is kept off: those named by its recoveries, newest last."""
    seen: dict[str, None] = {}
    for rec in recoveries:
        if rec.node:
            seen.pop(rec.node, None)
            seen[rec.node] = None
    return tuple(seen)[-MAX_AVOIDED_NODES:]


def with_avoided_nodes(affinity: Mapping[str, Any] | None, nodes: tuple[str, ...]) -> dict[str, Any] | None:
    """The pod affinity with a required `NotIn` on the hostname label for `nodes`, ANDed into every one of
    the user's required node selector terms (terms are ORed, so each must exclude the nodes)."""
    out: dict[str, Any] = deepcopy(dict(affinity or {}))
    if not nodes:
        return out or None
    expr = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": list(nodes)}
    node_aff = out.setdefault("nodeAffinity", {})
    required = node_aff.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [
        {**term, "matchExpressions": [*(term.get("matchExpressions") or []), expr]} for term in terms
    ]
    return out
