"""Secrets (issue 14, part 7), operator side: the values of the S3 credentials Secret an SFTJob references
never appear in its status, the namespace's Events, the operator's log, the child objects (the trainer
config in their pod templates included; the pods get them through secretKeyRef only) or the operator's
metrics. The trainer side is
tests/trainer/test_secrets_trainer.py; a missing Secret on a real kubelet is tests/node."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from conftest import Operator, apply, get, sftjob, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_credential_values_never_leave_the_secret(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube = sftjob_crd
    access, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    kube.kubectl(
        "create",
        "secret",
        "generic",
        "s3-creds",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={access}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={secret}",
    )
    job = sftjob("secretive", delay="1s")
    job["spec"]["output"]["credentialsSecret"] = {"name": "s3-creds"}
    apply(kube, namespace, job)
    wait_phase(kube, namespace, "secretive", "Succeeded", 120, operator)

    train = kube.get_json("job", "secretive-train", "-n", namespace)
    env = {e["name"]: e for e in train["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    places = {
        "sftjob": json.dumps(get(kube, namespace, "secretive")),
        "events": json.dumps(kube.get_json("events", "-n", namespace)),
        "jobs": json.dumps(kube.get_json("jobs", "-n", namespace)),
        "pods": json.dumps(kube.get_json("pods", "-n", namespace)),
        "services": json.dumps(kube.get_json("services", "-n", namespace)),
        "operator log": operator.proc.log_path.read_text(errors="replace") if operator.proc else "",
        "operator metrics": operator.metrics(),
    }
    for where, text in places.items():
        assert access not in text and secret not in text, f"a credential value in the {where}"
