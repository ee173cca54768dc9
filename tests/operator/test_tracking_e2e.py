"""spec.tracking.mlflow through the operator on the real control plane (KWOK pods): the MLflow run id the
stages report in their termination messages reaches status.tracking, and the Jobs get the credentials from
the Secret as environment variables (docs/tracking.md). The trainer's side against a real MLflow server is
tests/pipeline/test_tracking_mlflow.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import Operator, apply, jobs, sftjob, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_mlflow_run_id_reaches_status(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    run = {
        "mlflowRunId": "0af5c3e1d2b84e9f",
        "mlflowExperimentId": "7",
        "mlflowTrackingUri": "http://127.0.0.1:5000",
    }
    annotations = {
        "kwok.sftjob.dev/delay": "1s",
        # what every stage writes on success (the eval pod next to its evalResults)
        "kwok.sftjob.dev/message": json.dumps({"evalResults": {"evalLoss": 1.25}, "tracking": run}),
    }
    tracking = {
        "mlflow": {
            "trackingUri": "http://127.0.0.1:5000",
            "experiment": "e2e",
            "credentialsSecret": {"name": "mlflow-credentials", "tokenKey": "token"},
        }
    }
    apply(
        kube,
        namespace,
        sftjob("tracked", resources={"gpusPerNode": 1, "podAnnotations": annotations}, tracking=tracking),
    )
    st = wait_phase(kube, namespace, "tracked", ("Failed", "Succeeded"), 90, operator)
    assert st["phase"] == "Succeeded", st
    assert st["tracking"] == run
    for job in jobs(kube, namespace):
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        token = env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": "mlflow-credentials", "key": "token", "optional": True}
        assert "MLFLOW_TRACKING_PASSWORD" in env and "value" not in env["MLFLOW_TRACKING_PASSWORD"]
