"""The tiny-model SFTJobs of the real node's resilience tests (pod deletion, suspend, Stuck), and the helpers
they share with the README run's tests."""

from __future__ import annotations

import json
from typing import Any

from testbed.node import NODE_SELECTOR, TOLERATIONS
from testbed.operator_e2e import load
from testbed.procs import wait_until

from .conftest import S3_SECRET

# The operator e2e tests' SFTJob helpers: status(kube, ns, name), condition(status, type), pods(kube, ns, sel).
_e2e = load()
status, condition, pods = _e2e.status, _e2e.condition, _e2e.pods

GROUP = "sft.tuning.dev"


def sftjob(name: str, prefix: str, endpoint: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": f"{prefix}/models/tiny"},
        "dataset": {
            "train": [f"{prefix}/data/train.jsonl"],
            "eval": [f"{prefix}/data/eval.jsonl"],
            "format": "alpaca",
            "maxSeqLength": 96,
        },
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {
            "maxSteps": 24,
            "learningRate": 3e-3,
            "globalBatchSize": 4,  # micro 1 x 2 ranks x accumulation 2
            "microBatchSize": 1,
            "gradientCheckpointing": False,
            "checkpointSteps": 4,
        },
        "resources": {
            "nodes": 2,
            "gpusPerNode": 0,
            "cpu": "900m",  # 2 ranks + the operator (100m) fit 2 cores; at 250m a rank crawled
            "memory": "3Gi",
            "shmSize": "512Mi",
            "nodeSelector": NODE_SELECTOR,
            "tolerations": TOLERATIONS,
        },
        "output": {
            "uri": f"{prefix}/runs",
            "endpoint": endpoint,
            "pathStyle": True,
            "region": "us-east-1",
            "credentialsSecret": {"name": S3_SECRET},
        },
        "eval": {"maxSamples": 8, "maxNewTokens": 8},
        "merge": {"dtype": "float32"},
        "runPolicy": {"stuckPendingTimeoutSeconds": 30},
    }
    for key, value in over.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "SFTJob", "metadata": {"name": name}, "spec": spec}


def apply_sftjob(kube: Any, ns: str, name: str, prefix: str, endpoint: str, **over: Any) -> None:
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(sftjob(name, prefix, endpoint, **over)))


def wait_status(kube: Any, ns: str, name: str, check: Any, timeout: float, what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = status(kube, ns, name)
        if st.get("phase") == "Failed" and "Failed" not in what:
            raise AssertionError(f"{name} Failed: {json.dumps(st, indent=1)}")
        return st if check(st) else None

    try:
        return wait_until(probe, timeout, f"{name}: {what}", interval=1.0)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nstatus: {json.dumps(status(kube, ns, name), indent=1)}") from e


def logs(kube: Any, ns: str, pod: str) -> str:
    return kube.kubectl("logs", "-n", ns, pod, check=False).stdout


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
