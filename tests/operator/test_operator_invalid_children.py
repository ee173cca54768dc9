"""Specs the SFTJob schema admits but core/v1 would refuse (issue 14, part 8): what the CRD can check is refused
at admission naming the field; what only the apiserver's Job validation catches ends Failed/InvalidSpec
naming the spec field and quoting the apiserver, never a create retried forever."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import Operator, apply, condition, jobs, sftjob, wait_event, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"podLabels": {"team": "x" * 64}}, "spec.resources.podLabels"),
        ({"podLabels": {"a" * 64: "x"}}, "spec.resources.podLabels"),
        ({"nodeSelector": {"not a label key": "x"}}, "spec.resources.nodeSelector"),
        ({"nodeSelector": {"kubernetes.io/arch": "amd64; rm -rf /"}}, "spec.resources.nodeSelector"),
        ({"podAnnotations": {"-bad/key": "x"}}, "spec.resources.podAnnotations"),
    ],
)
def test_labels_and_node_selector_refused_at_admission(
    sftjob_crd: Any, namespace: str, resources: dict[str, Any], field: str
) -> None:
    bad = sftjob("labels", resources=resources)
    r = sftjob_crd.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert r.returncode != 0
    assert field in r.stderr, r.stderr


def test_valid_label_keys_admitted(sftjob_crd: Any, namespace: str) -> None:
    good = sftjob(
        "labels-ok",
        resources={
            "podLabels": {"app.kubernetes.io/part-of": "sft", "x" * 63: "y" * 63, "empty": ""},
            "nodeSelector": {"kubernetes.io/arch": "amd64"},
        },
    )
    apply(sftjob_crd, namespace, good)


@pytest.mark.parametrize(
    ("resources", "field", "quote"),
    [
        # refused by the apiserver's Job validation (422), quoted
        (
            {"tolerations": [{"key": "gpu", "operator": "Sometimes"}]},
            "spec.resources.tolerations",
            "is invalid",
        ),
        ({"priorityClassName": "Not_A_Name"}, "spec.resources.priorityClassName", "is invalid"),
        # under the 256 KiB cap on a pod's annotations alone, over it with the trainer config beside them
        (
            {"podAnnotations": {f"a{i}": "x" * (65536 - 200) for i in range(4)}},
            "spec.resources.podAnnotations (with the trainer config",
            "Too long",
        ),
        # refused by the Kubernetes client's core/v1 models before it is sent (a required field missing)
        (
            {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}},
            "spec.resources.affinity",
            "nodeSelectorTerms",
        ),
    ],
)
def test_child_refused_ends_invalid_spec(
    sftjob_crd: Any, namespace: str, operator: Operator, resources: dict[str, Any], field: str, quote: str
) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("refused", resources=resources))
    st = wait_phase(kube, namespace, "refused", "Failed", 60, operator)
    assert st["reason"] == "InvalidSpec"
    assert st["message"].startswith(field) and 'refused the train Job "refused-train"' in st["message"], st
    assert quote in st["message"], st
    assert condition(st, "Failed")["reason"] == "InvalidSpec"
    assert jobs(kube, namespace) == []
    wait_event(kube, namespace, "refused", "InvalidSpec")
    assert operator.proc is not None and operator.proc.alive()
    assert "Traceback" not in operator.log()
