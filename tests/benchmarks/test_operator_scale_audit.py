"""The audit-log summary of benchmarks/operator_scale.py (benchmarks/operator_scale_audit.py) on hand-written
audit events: which requests count, what a write touched. The benchmark itself needs the test bed and minutes;
run it by hand (docs/performance.md)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))

import operator_scale_audit as audit  # noqa: E402

OP = "system:serviceaccount:sys:op"


def event(
    verb: str, resource: str, stage: str = "ResponseComplete", user: str = OP, **kw: Any
) -> dict[str, Any]:
    ref = {"resource": resource.split("/")[0], "namespace": "ns", "name": kw.pop("name", "a")}
    if "/" in resource:
        ref["subresource"] = resource.split("/")[1]
    return {
        "auditID": kw.pop("audit_id", f"{verb}-{resource}-{stage}"),
        "stage": stage,
        "verb": verb,
        "user": {"username": user},
        "objectRef": ref,
        "responseStatus": {"code": kw.pop("code", 200)},
        "stageTimestamp": kw.pop("at", "2026-12-01T01:00:00.250000Z"),
        "requestObject": kw.pop("body", None),
    }


def test_counts_completed_requests_and_names_what_writes_touched(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    events = [
        event("patch", "sftjobs/status", stage="ResponseStarted"),  # not complete: not counted
        event("patch", "sftjobs/status", body={"status": {"phase": "Training", "conditions": []}}),
        event("patch", "sftjobs/status", code=409, audit_id="2", body={"status": {"phase": "Training"}}),
        event(
            "patch",
            "sftjobs",
            body=[
                {"op": "test", "path": "/metadata/resourceVersion"},
                {"op": "add", "path": "/metadata/finalizers"},
            ],
        ),
        event(
            "patch", "sftjobs", audit_id="3", body={"metadata": {"annotations": {"x.dev/last-handled": "{}"}}}
        ),
        event("get", "sftjobs"),
        event("create", "jobs", user="admin", name="", body={"metadata": {"name": "a-train"}}),
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    reqs = list(audit.read(log))
    assert len(reqs) == 6
    created = [r for r in reqs if r.user == "admin"]
    assert created[0].name == "a-train" and created[0].at % 1 == 0.25
    ours = [r for r in reqs if r.user == OP]
    assert sum(r.write for r in ours) == 4
    counts = audit.by_verb_resource(ours)
    assert counts[("patch", "sftjobs/status")] == 2 and counts[("get", "sftjobs")] == 1
    touched = audit.by_write_fields(ours)
    assert touched[("patch", "sftjobs/status", "status.conditions,phase")] == 1
    assert touched[("patch", "sftjobs", "json-patch: add /metadata/finalizers")] == 1
    assert touched[("patch", "sftjobs", "metadata.annotations.last-handled")] == 1
    rows = audit.per_lifecycle(counts, 2)
    assert rows[0] == (("patch", "sftjobs/status"), 2, 1.0)


def test_policy_logs_the_operator_and_creations_only() -> None:
    p = audit.policy(OP)
    assert p["rules"][-1] == {"level": "None"}
    assert all(r.get("users") == [OP] for r in p["rules"][:2])


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert audit.percentile(values, 50) == 50.0
    assert audit.percentile(values, 99) == 99.0
    assert audit.percentile([3.0], 99) == 3.0
