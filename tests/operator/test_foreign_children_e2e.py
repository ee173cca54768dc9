"""Only our own children (issue 25, item 6): objects someone else made under the names an SFTJob's children
would take — even carrying the operator's labels — are never adopted, patched or deleted, on the create path
or by the TTL clean-up; the SFTJob says which object is in the way."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Operator, apply, events, sftjob, wait_event, wait_phase
from testbed.procs import wait_until

pytestmark = pytest.mark.e2e

ONLY_TRAIN = {"eval": {"enabled": False}, "merge": {"enabled": False}}
TTL = {"runPolicy": {"ttlSecondsAfterFinished": 1, "ttlPolicy": "DeleteChildren"}}


def foreign_job(name: str, sftjob_name: str, stage: str) -> dict[str, Any]:
    """A suspended Job with no ownerReference, labelled as if it were the operator's (impersonation)."""
    labels = {"sft.tuning.dev/job-name": sftjob_name, "sft.tuning.dev/stage": stage}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "registry.invalid/someone-else:1"}],
                }
            },
        },
    }


def foreign_service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "selector": {"app": "someone-else"}},
    }


def uid_of(kube: Any, namespace: str, kind: str, name: str) -> str | None:
    r = kube.kubectl("get", kind, name, "-n", namespace, "-o", "jsonpath={.metadata.uid}", check=False)
    return r.stdout.strip() or None if r.returncode == 0 else None


@pytest.mark.timeout(90)
def test_foreign_objects_under_child_names_survive_create_and_ttl(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    # ~20 s: three SFTJobs at once, each with a 1 s train stage and a 1 s TTL.
    kube = sftjob_crd
    planted = [
        ("service", "svc-train"),  # the headless Service of the 2-node run "svc"
        ("job", "job-train"),  # the train Job of "job"
        ("job", "ttl-eval"),  # a stage Job name "ttl" never uses (eval off), cleaned up by name before
    ]
    apply(
        kube,
        namespace,
        foreign_service("svc-train"),
        foreign_job("job-train", "job", "train"),
        foreign_job("ttl-eval", "ttl", "eval"),
    )
    uids = {name: uid_of(kube, namespace, kind, name) for kind, name in planted}
    assert all(uids.values()), uids
    apply(
        kube,
        namespace,
        sftjob("svc", resources={"nodes": 2, "gpusPerNode": 1}, **ONLY_TRAIN, **TTL),
        sftjob("job", **ONLY_TRAIN, **TTL),
        sftjob("ttl", **ONLY_TRAIN, **TTL),
    )

    st = wait_phase(kube, namespace, "ttl", ("Failed", "Succeeded"), 60, operator)
    assert st["phase"] == "Succeeded", st

    # The TTL clean-up of "ttl" removes its own train Job, and only that.
    wait_until(lambda: uid_of(kube, namespace, "job", "ttl-train") is None, 30, "ttl's own Job deleted")
    wait_event(kube, namespace, "ttl", "TTLExpired")
    assert uid_of(kube, namespace, "job", "ttl-eval") == uids["ttl-eval"]  # the neighbour it named survives

    for name, what in (("svc", "train Service"), ("job", "train Job")):
        st = wait_phase(kube, namespace, name, ("Failed", "Succeeded"), 60, operator)
        assert (st["phase"], st["reason"]) == ("Failed", "NameConflict"), st
        assert (
            f"{namespace}/{name}-train already exists and is not this SFTJob's (owner: none)" in st["message"]
        )
        assert what.split()[-1] in st["message"], st["message"]
        evs = [e for e in events(kube, namespace, name) if e["reason"] == "NameConflict"]
        assert evs and evs[0]["type"] == "Warning" and f"{name}-train" in evs[0]["message"], evs
    for kind, name in planted:
        obj = kube.get_json(kind, name, "-n", namespace)
        assert obj["metadata"]["uid"] == uids[name], name  # the very object, never deleted and re-made
        assert not obj["metadata"].get("ownerReferences"), obj["metadata"]  # never adopted
        if kind == "job":
            assert obj["spec"]["suspend"] is True, name  # never patched
    assert uid_of(kube, namespace, "job", "svc-train") is None  # nothing was started beside the conflict
