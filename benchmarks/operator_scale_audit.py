"""The kube-apiserver's audit log, summarised for benchmarks/operator_scale.py (pure functions, no I/O but
reading the file): which requests one client identity made, by verb and resource, and which fields its
writes touched. The counts are the apiserver's own: nothing is counted inside the operator."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
READ_VERBS = frozenset({"get", "list"})


def policy(user: str) -> dict[str, Any]:
    """An audit Policy: every request of `user` (bodies of its writes included, to see which fields a patch
    touches); the creation of SFTJobs and Jobs by anyone (apply and floor timestamps); nothing else."""
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "Request", "users": [user], "verbs": sorted(WRITE_VERBS)},
            {"level": "Metadata", "users": [user]},
            {
                "level": "Request",  # the name of a created object may only be in its body
                "verbs": ["create"],
                "resources": [
                    {"group": "sft.tuning.dev", "resources": ["sftjobs"]},
                    {"group": "batch", "resources": ["jobs"]},
                ],
            },
            {"level": "None"},
        ],
    }


@dataclass(frozen=True)
class Request:
    audit_id: str
    user: str
    verb: str
    resource: str  # "sftjobs/status", "jobs", ...
    namespace: str
    name: str
    code: int
    at: float  # stageTimestamp of ResponseComplete, seconds since the epoch
    body: Any  # requestObject (writes of the audited user only)

    @property
    def write(self) -> bool:
        return self.verb in WRITE_VERBS


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read(path: Path) -> Iterator[Request]:
    """One Request per completed request (watches: when they end; a still-open watch is not in the log)."""
    with path.open() as f:
        for line in f:
            ev = json.loads(line)
            if ev.get("stage") != "ResponseComplete":
                continue
            ref = ev.get("objectRef") or {}
            resource = ref.get("resource", "")
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            yield Request(
                audit_id=ev["auditID"],
                user=(ev.get("user") or {}).get("username", ""),
                verb=ev.get("verb", ""),
                resource=resource,
                namespace=ref.get("namespace", ""),
                name=ref.get("name", "") or _created_name(ev),
                code=int((ev.get("responseStatus") or {}).get("code") or 0),
                at=_ts(ev["stageTimestamp"]),
                body=ev.get("requestObject"),
            )


def _created_name(ev: dict[str, Any]) -> str:
    """A create's objectRef has no name at Metadata level before 1.3x; take it from the body if logged."""
    body = ev.get("requestObject") or {}
    return str((body.get("metadata") or {}).get("name") or "")


def fields(req: Request) -> str:
    """What a write touched, in short: a status patch's top-level status keys, a patch's metadata keys."""
    if req.verb != "patch":
        return ""
    if isinstance(req.body, list):  # a JSON patch (kopf's finalizer): its operations
        ops = [
            f"{o.get('op')} {o.get('path')}"
            for o in req.body
            if isinstance(o, dict) and o.get("op") != "test"
        ]
        return "json-patch: " + ", ".join(ops)
    body = req.body if isinstance(req.body, dict) else {}
    parts: list[str] = []
    if isinstance(body.get("status"), dict):
        parts.append("status." + ",".join(sorted(body["status"])))
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    for key in ("annotations", "labels"):
        if isinstance(meta.get(key), dict):
            parts.append(f"metadata.{key}." + ",".join(sorted(k.rsplit("/", 1)[-1] for k in meta[key])))
    if "finalizers" in meta:
        parts.append("metadata.finalizers")
    if isinstance(body.get("spec"), dict):
        parts.append("spec." + ",".join(sorted(body["spec"])))
    return " ".join(parts) or ",".join(sorted(body)) or "(empty)"


def by_verb_resource(reqs: Iterable[Request]) -> Counter[tuple[str, str]]:
    return Counter((r.verb, r.resource) for r in reqs)


def by_write_fields(reqs: Iterable[Request]) -> Counter[tuple[str, str, str]]:
    return Counter((r.verb, r.resource, fields(r)) for r in reqs if r.write)


def per_lifecycle(counts: Counter[Any], n: int) -> list[tuple[Any, int, float]]:
    """(key, count, count per SFTJob), most frequent first."""
    return [(k, c, c / n) for k, c in counts.most_common()]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
