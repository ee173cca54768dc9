"""`sftjob run` end to end on the tiny model: invalid specs stop before any work; Ctrl-C checkpoints and a
re-run resumes, then eval, merge, report and a manifest that verifies against S3 (real SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .sftjob_cli import CLI, write_spec


def spec_doc(model_dir: str, **over: object) -> dict:
    doc = {
        "apiVersion": "sft.tuning.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "tiny-run"},
        "spec": {
            "model": {"uri": model_dir},
            "dataset": {
                "train": ["./train.jsonl"],
                "eval": ["./eval.jsonl"],
                "format": "alpaca",
                "maxSeqLength": 96,
            },
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "training": {
                "maxSteps": 16,
                "learningRate": 3e-3,
                "globalBatchSize": 4,
                "microBatchSize": 2,
                "gradientCheckpointing": False,
                "checkpointSteps": 4,
            },
            "resources": {"nodes": 1, "gpusPerNode": 0, "deepspeed": {"zeroStage": 0}},
            "output": {"uri": "./runs"},
            "eval": {"maxSamples": 8, "maxNewTokens": 8},
            "merge": {"dtype": "float32"},
        },
    }
    doc["spec"].update(over)
    return doc


@pytest.mark.parametrize(
    "broken, expected",
    [
        ({"training": {"globalBatchSize": 4, "microBatchSize": 3}}, "spec.training.microBatchSize: "),
        ({"method": {"type": "prefix-tuning"}}, "spec.method.type: "),
        ({"dataset": {"train": ["relative/no-dot.jsonl"]}}, "spec.dataset.train.0: "),
    ],
)
def test_invalid_spec_prints_field_path_and_does_no_work(tmp_path, broken, expected):
    spec = write_spec(tmp_path / "bad.yaml", spec_doc("/nonexistent/model", **broken))
    work = tmp_path / "work"
    proc = subprocess.run(
        [*CLI, "run", spec, "--work-dir", str(work)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert expected in proc.stderr, proc.stderr
    assert "phase" not in proc.stdout  # not even Pending
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]  # no output dir, no work dir


def held_after_step(step: int, env: dict[str, str]) -> dict[str, str]:
    """The environment for a run whose trainer waits after `step` until its SIGTERM comes (a test-only knob,
    docs/trainer.md): an interrupt sent after that step lands mid-training however fast the machine is."""
    return {**env, "SFTJOB_TEST_HOLD_AFTER_STEP": str(step)}


def sigint_after_step(cmd: list[str], cwd: Path, env: dict[str, str], work: Path, step: int = 2) -> str:
    """Run `cmd` held after `step`, Ctrl-C it there; returns its output once it exited 130."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=held_after_step(step, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(str(work / "steps.jsonl"), proc, step)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log[-3000:]
    return log


def wait_for_step(steps_file: str, proc: subprocess.Popen, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "sftjob run ended before it could be interrupted"
        if os.path.exists(steps_file):
            with open(steps_file) as f:
                if any(json.loads(x)["step"] >= step for x in f if x.strip()):
                    return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.trainer
@pytest.mark.slow
def test_interrupted_run_resumes_and_completes_on_s3(tiny_model_dir, tmp_path, s3):
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(240, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(12, seed=2))
    out = {"uri": f"s3://{s3.bucket}/runs", "endpoint": s3.endpoint_url, "pathStyle": True}
    spec = write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, output=out))
    work = tmp_path / "work"
    env = {**os.environ, **s3.env(), "OMP_NUM_THREADS": "1"}
    cmd = [*CLI, "run", spec, "--work-dir", str(work)]

    log1 = sigint_after_step(cmd, tmp_path, env, work)
    assert "interrupted by SIGINT in phase Training: the train stage stopped" in log1, log1[-3000:]
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="runs/")["Contents"]]
    done = sorted(int(m[1]) for k in keys if (m := re.search(r"/checkpoints/[^/]+/step-(\d+)/COMPLETE$", k)))
    assert done == [3], keys  # the step in flight when SIGTERM reached the held trainer, then its checkpoint
    assert f"checkpoint step-{done[-1]} saved" in log1
    assert not any(k.endswith("manifest.json") for k in keys)

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from step {done[-1]}" in second.stdout
    for phase in ("Pending", "Training", "Evaluating", "Merging", "Succeeded"):
        assert f"phase {phase}" in second.stdout
    assert "exact match" in second.stdout and "eval loss" in second.stdout

    # curated once: the first train stage's rank 0 curated (no curate stage without spec.dataset.curation),
    # saved the data in S3 and cut this run's shard; the resumed one read that shard only, the eval stage the
    # held-out part
    def events(stage: str, name: str) -> list[dict]:
        lines = (work / f"{stage}.log").read_text().splitlines()
        return [e for x in lines if x.startswith("{") and (e := json.loads(x))["event"] == name]

    [cold, warm] = events("train", "data")
    [ev] = events("eval", "eval_data")
    assert cold["curated_key"] == warm["curated_key"] == ev["curated_key"]
    assert len(events("train", "curating")) == 1  # the first attempt only
    [fetched_cold, fetched_warm] = [e["keys"] for e in events("train", "data_fetched")]
    shard = f"{cold['curated_key']}/shards/"
    assert fetched_cold == fetched_warm and len(fetched_cold) == 1 and fetched_cold[0].startswith(shard)
    curated = "runs/local/_curated/"
    stored = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=curated)["Contents"]]
    assert f"{curated}{cold['curated_key']}/COMPLETE" in stored and curated + fetched_cold[0] in stored

    root = "runs/local/tiny-run/"

    def get(key: str) -> bytes:
        return client.get_object(Bucket=s3.bucket, Key=root + key)["Body"].read()

    summary = json.loads(get("train/summary.json"))
    assert summary["resumed_from"] == done[-1] and summary["steps"] == 16
    manifest = json.loads(get("manifest.json"))
    paths = {f["path"] for f in manifest["files"]}
    assert {
        "adapter/adapter_model.safetensors",
        "eval/results.json",
        "merged/model.safetensors",
        "report/report.md",
        "report/loss_curve.png",
    } <= paths
    for f in manifest["files"]:
        body = get(f["path"])
        assert (len(body), hashlib.sha256(body).hexdigest()) == (f["size"], f["sha256"]), f["path"]
    assert get("report/loss_curve.png")[:4] == b"\x89PNG"


@pytest.mark.trainer
@pytest.mark.slow
def test_run_with_embedded_s3(tiny_model_dir, tmp_path):

    from trainer.tiny import dataset_rows, write_jsonl

    from sftjob_api.manifest import verify_manifest
    from sftjob_api.storage import S3Store
    from sftjob_operator.local.embedded_s3 import EmbeddedS3

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(60, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(6, seed=2))
    training = {"maxSteps": 3, "globalBatchSize": 4, "microBatchSize": 2, "gradientCheckpointing": False}
    spec = write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, training=training))
    env = {**os.environ, "SFTJOB_S3_DIR": str(tmp_path / "s3"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*CLI, "run", spec, "--embedded-s3", "--work-dir", str(tmp_path / "work")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embedded S3 (SeaweedFS) at http://127.0.0.1:" in proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing went to the local directory

    server = EmbeddedS3(str(tmp_path / "s3")).start()  # the data outlives the command
    try:
        store = S3Store("s3://sftjob/runs/local/tiny-run", client=server.client())
        assert store.exists("manifest.json")
        assert verify_manifest(store) == []
        assert store.exists("merged/model.safetensors")
    finally:
        server.stop()
