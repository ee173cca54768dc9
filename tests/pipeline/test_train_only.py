"""A run whose last stage is training (eval and merge off, or method full with eval off) ends with a
manifest.json that verifies, in a cluster and under `sftjob run` alike: the final stage of stages(spec)
writes it. (Once only the eval and merge stages wrote it, so such runs never looked complete.)

"In a cluster" here is the train pod without Kubernetes: the config file and the container command and env
the operator renders, run as they are (Kubernetes' $(VAR) expansion and Secret refs filled in by the test),
against real S3 (SeaweedFS) reached only through spec.output's endpoint and pathStyle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from pod_files import trainer_config_file

from sftjob_api import Layout, Stage, parse_spec
from sftjob_api.layout import status_artifacts
from sftjob_api.manifest import verify_manifest
from sftjob_api.ports import free_port
from sftjob_api.storage import LocalStore, S3Store
from sftjob_operator.render import objects as o
from sftjob_operator.render.trainer_config import CONFIG_PATH

from .sftjob_cli import clean_env, sftjob_doc, sftjob_run, write_spec

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

ENDS_WITH_TRAINING = {
    "lora-eval-and-merge-off": {
        "method": {"type": "lora"},
        "eval": {"enabled": False},
        "merge": {"enabled": False},
    },
    "full-eval-off": {"method": {"type": "full"}, "eval": {"enabled": False}},
}


def spec_doc(model_dir: str, data: str, output: dict[str, Any], case: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": model_dir},
        "dataset": {"train": [data], "format": "alpaca", "maxSeqLength": 96},
        "training": {
            "maxSteps": 3,
            "globalBatchSize": 4,
            "microBatchSize": 2,
            "gradientCheckpointing": False,
        },
        "resources": {"nodes": 1, "gpusPerNode": 0, "deepspeed": {"zeroStage": 0}},
        "output": output,
        **ENDS_WITH_TRAINING[case],
    }
    return spec


def assert_complete(store: Any, method: str) -> dict[str, Any]:
    assert store.exists(Layout.MANIFEST)
    assert verify_manifest(store) == []
    manifest = json.loads(store.get_bytes(Layout.MANIFEST))
    assert manifest["stages"] == {
        "curate": "skipped",
        "train": "done",
        "align": "skipped",
        "eval": "skipped",
        "merge": "skipped",
    }
    paths = {f["path"] for f in manifest["files"]}
    assert Layout.TRAIN_SUMMARY in paths, paths
    assert any(p.startswith(Layout.weights(method) + "/") for p in paths), paths
    return manifest


def pod_command(job: dict[str, Any], config: str, env: dict[str, str]) -> list[str]:
    """The container command with what Kubernetes would expand."""
    [container] = job["spec"]["template"]["spec"]["containers"]
    cmd = []
    for arg in container["command"]:
        for var, value in env.items():
            arg = arg.replace(f"$({var})", value)
        cmd.append(config if arg == CONFIG_PATH else arg)
    assert cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


def pod_env(job: dict[str, Any], s3: Any, config: str, tmp_path: Any) -> dict[str, str]:
    """The container env: values as rendered, Secret refs from the test bucket's keys, field refs filled."""
    [container] = job["spec"]["template"]["spec"]["containers"]
    keys = s3.env()
    # a clean environment (nothing of the test process's S3 settings); HOME keeps DeepSpeed's compiled ops
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ["HOME"],
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env["SFTJOB_WORK_DIR"] = str(tmp_path / "pod-tmp")  # the pod's /tmp emptyDir
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = keys[e["valueFrom"]["secretKeyRef"]["key"]]
    env.update(JOB_COMPLETION_INDEX="0", POD_NAME="tiny-train-0")  # MASTER_ADDR: one pod meets on 127.0.0.1
    env.update(MASTER_PORT=str(free_port()), SFTJOB_CONFIG=config)
    env["SFTJOB_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    assert "AWS_ENDPOINT_URL" not in env  # the endpoint reaches the trainer through its config only
    return env


def run_train_pod(spec: Any, s3: Any, tmp_path: Any) -> dict[str, str]:
    """The train pod the operator renders for `spec` (SFTJob team-a/tiny), run to its end; returns its env."""
    ref = o.SFTJobRef("tiny", "team-a", "uid-1")
    config = tmp_path / "config.yaml"
    job = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions(metrics_port=free_port()))
    config.write_text(trainer_config_file(job))
    env = pod_env(job, s3, str(config), tmp_path)
    proc = subprocess.run(
        pod_command(job, str(config), env), env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return env


@pytest.mark.parametrize("case", sorted(ENDS_WITH_TRAINING))
def test_train_only_in_a_cluster_ends_with_a_verifying_manifest(case, s3, tiny_model_dir, tmp_path):
    from trainer.tiny import dataset_rows, write_jsonl

    data = write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(40, seed=1))
    output = {
        "uri": s3.uri("runs"),
        "endpoint": s3.endpoint_url,
        "pathStyle": True,
        "credentialsSecret": {"name": "s3"},
    }
    spec = parse_spec(spec_doc(tiny_model_dir, data, output, case))
    run_train_pod(spec, s3, tmp_path)

    artifacts = status_artifacts(spec, "team-a", "tiny")  # what status.artifacts advertises
    assert artifacts.manifest == f"{artifacts.root}{Layout.MANIFEST}"
    store = S3Store(str(artifacts.root), s3.client())
    manifest = assert_complete(store, spec.method.type)
    assert manifest["config"]["output"]["pathStyle"] is True


@pytest.mark.parametrize("case", sorted(ENDS_WITH_TRAINING))
def test_train_only_with_sftjob_run_ends_with_a_verifying_manifest(case, tiny_model_dir, tmp_path):
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(40, seed=1))
    spec = spec_doc(tiny_model_dir, "./train.jsonl", {"uri": "./runs"}, case)
    write_spec(tmp_path / "tiny.yaml", sftjob_doc("tiny", spec))
    proc = sftjob_run("tiny.yaml", tmp_path, env=clean_env(OMP_NUM_THREADS="1"), timeout=600)
    assert "phase Evaluating" not in proc.stdout and "phase Merging" not in proc.stdout
    assert "phase Succeeded" in proc.stdout

    store = LocalStore(str(tmp_path / "runs" / "local" / "tiny"))
    manifest = assert_complete(store, spec["method"]["type"])
    assert {Layout.REPORT_MD, Layout.LOSS_CURVE} <= {f["path"] for f in manifest["files"]}
