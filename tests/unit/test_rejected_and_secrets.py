"""Pure parts of issue 14's fixes: label rules (sftjob_api.labels), refused child objects
(render/rejected.py), and a missing Secret named in the Stuck message (render/stuck.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from sftjob_api.labels import is_qualified_name
from sftjob_operator.render.observe import PodObs, Waiting
from sftjob_operator.render.rejected import rejection_message, spec_field, validation_message
from sftjob_operator.render.stuck import detect_stuck


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("app", True),
        ("app.kubernetes.io/name", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("example.com/" + "a" * 63, True),
        ("Example.com/a", False),
        ("-a", False),
        ("a/b/c", False),
        ("", False),
        ("a b", False),
        ("x" * 254 + "/a", False),
    ],
)
def test_qualified_names(key: str, ok: bool) -> None:
    assert is_qualified_name(key) is ok


def test_spec_field_of_a_child_field() -> None:
    assert spec_field("spec.template.spec.tolerations[0].operator") == "spec.resources.tolerations"
    assert spec_field("spec.template.metadata.labels") == "spec.resources.podLabels"
    assert spec_field("spec.template.spec.nodeSelector.x") == "spec.resources.nodeSelector"
    assert spec_field("spec.template.spec.containers[0].imagePullPolicy") is None


def test_rejection_message_quotes_the_apiserver_and_names_the_spec_field() -> None:
    body = {
        "kind": "Status",
        "message": 'Job.batch "x-train" is invalid: spec.template.spec.tolerations[0].operator: Unsupported value',
        "reason": "Invalid",
        "details": {"causes": [{"field": "spec.template.spec.tolerations[0].operator", "message": "m"}]},
        "code": 422,
    }
    msg = rejection_message("train Job", "x-train", 422, json.dumps(body))
    assert msg.startswith("spec.resources.tolerations: the apiserver refused the train Job")
    assert body["message"] in msg
    # no causes, or a body that is not JSON: still a message, about the spec
    assert rejection_message("Service", "s", 400, "garbage").startswith("spec: the apiserver refused")


def test_validation_message_drops_the_argument_position() -> None:
    errors = [{"loc": (2, "spec", "template", "spec", "affinity", "nodeAffinity"), "msg": "Field required"}]
    msg = validation_message("train Job", "x-train", errors)
    assert msg.startswith("spec.resources.affinity: the Kubernetes API client refused")
    assert "spec.template.spec.affinity.nodeAffinity: Field required" in msg


@pytest.mark.parametrize(
    "kubelet",
    [
        'secret "s3-creds" not found',
        "couldn't find key AWS_ACCESS_KEY_ID in Secret team-a/s3-creds",
    ],
)
def test_missing_secret_is_stuck_naming_the_secret_and_the_field(kubelet: str) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    pod = PodObs(
        name="x-train-0",
        stage="train",
        phase="Pending",
        created=now - timedelta(seconds=600),
        scheduled=True,
        waiting=(Waiting("CreateContainerConfigError", kubelet),),
    )
    stuck = detect_stuck([pod], now, 0, False, [], now, 300)
    assert stuck is not None and stuck.reason == "CreateContainerConfigError"
    assert kubelet in stuck.message and "spec.output.credentialsSecret" in stuck.message
