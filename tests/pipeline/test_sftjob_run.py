"""`sftjob run` end to end on the tiny model: invalid specs stop before any work; Ctrl-C checkpoints, a
re-run from an edited manifest is refused naming the field, a re-run as written resumes, then eval, merge,
report and a manifest that verifies against S3 (real SeaweedFS); `--fresh` starts a new run; a run with
spec.alignment on the embedded S3 trains, aligns, evaluates and merges the aligned adapter."""

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
def test_interrupted_run_resumes_and_completes_on_s3(tiny_model_dir, tmp_path, s3, mlflow_server):
    """Also the MLflow test of one run across every stage and both invocations (docs/tracking.md): the same
    expensive run proves both."""
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(240, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(12, seed=2))
    out = {"uri": f"s3://{s3.bucket}/runs", "endpoint": s3.endpoint_url, "pathStyle": True}
    tracking = {
        "mlflow": {"trackingUri": mlflow_server.uri, "experiment": "sftjob-test", "tags": {"suite": "x"}}
    }
    as_written = {"output": out, "tracking": tracking}
    spec = write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, **as_written))
    work = tmp_path / "work"
    env = {**os.environ, **s3.env(), "OMP_NUM_THREADS": "1"}
    cmd = [*CLI, "run", spec, "--work-dir", str(work)]

    log1 = sigint_after_step(cmd, tmp_path, env, work)
    assert "interrupted by SIGINT in phase Training: the train stage stopped" in log1, log1[-3000:]
    client = s3.client()
    root = "runs/local/tiny-run/"

    def get(key: str) -> bytes:
        return client.get_object(Bucket=s3.bucket, Key=root + key)["Body"].read()

    pointer = json.loads(get("tracking/mlflow.json"))  # the MLflow run, created by the first attempt
    assert pointer["mlflowTrackingUri"] == mlflow_server.uri
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="runs/")["Contents"]]
    done = sorted(int(m[1]) for k in keys if (m := re.search(r"/checkpoints/[^/]+/step-(\d+)/COMPLETE$", k)))
    assert done == [3], keys  # the step in flight when SIGTERM reached the held trainer, then its checkpoint
    assert f"checkpoint step-{done[-1]} saved" in log1
    assert not any(k.endswith("manifest.json") for k in keys)

    # the manifest edited, the same work directory (the same run): refused naming the changed field, instead
    # of continuing the old optimizer state under the new learning rate (docs/recovery.md, run identity)
    training = spec_doc(tiny_model_dir)["spec"]["training"]
    edited = {**as_written, "training": {**training, "learningRate": 1e-3}}
    write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, **edited))
    refused = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    said = refused.stdout + refused.stderr
    # the train row's reason for exit code 4 (sftjob_api/stage_table.py)
    assert refused.returncode != 0 and "phase Failed: SpecChanged (exit code 4)" in said, said[-3000:]
    assert "spec.training.learningRate: 0.003 -> 0.001" in said, said[-3000:]
    run_id = (work / "run-id").read_text().strip()

    write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, **as_written))  # as written: it continues
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

    [cold, refused_data, warm] = events("train", "data")  # the refused attempt read the data too
    [ev] = events("eval", "eval_data")
    assert cold["curated_key"] == refused_data["curated_key"] == warm["curated_key"] == ev["curated_key"]
    assert len(events("train", "curating")) == 1  # the first attempt only
    [fetched_cold, _, fetched_warm] = [e["keys"] for e in events("train", "data_fetched")]
    shard = f"{cold['curated_key']}/shards/"
    assert fetched_cold == fetched_warm and len(fetched_cold) == 1 and fetched_cold[0].startswith(shard)
    curated = "runs/local/_curated/"
    stored = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=curated)["Contents"]]
    assert f"{curated}{cold['curated_key']}/COMPLETE" in stored and curated + fetched_cold[0] in stored

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
    tracked_in_one_mlflow_run(
        mlflow_server, pointer, second.stdout, work, json.loads(get("eval/results.json"))
    )

    # --fresh under the edited manifest: a new run (another id) trained from step 1, nothing resumed
    write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, **edited))
    (work / "steps.jsonl").unlink()  # the finished run's: the interrupt below waits for the new run's step 1
    log3 = sigint_after_step([*cmd, "--fresh"], tmp_path, env, work, step=1)
    assert (work / "run-id").read_text().strip() != run_id
    assert "resuming from step" not in log3, log3[-3000:]
    assert json.loads((work / "steps.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.trainer
@pytest.mark.slow
def test_run_with_embedded_s3_trains_aligns_evaluates_and_merges_the_aligned_adapter(
    tiny_model_dir, tmp_path
):
    """`--embedded-s3`, and also the local run of spec.alignment (docs/alignment.md): train -> align -> eval
    (held-out preference metrics and their gates) -> merge of the aligned adapter; one run proves both."""
    import torch
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import load_file
    from trainer.tiny import dataset_rows, preference_rows, write_jsonl

    from sftjob_api.evaluation import EvalGates
    from sftjob_api.manifest import verify_manifest
    from sftjob_api.storage import S3Store
    from sftjob_operator.local.embedded_s3 import EmbeddedS3
    from sftjob_trainer.eval_stage import metrics_of

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(40, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(4, seed=2))
    write_jsonl(str(tmp_path / "pairs.jsonl"), preference_rows(16, seed=3))
    write_jsonl(str(tmp_path / "held.jsonl"), preference_rows(6, seed=4))
    training = {"maxSteps": 3, "globalBatchSize": 4, "microBatchSize": 2, "gradientCheckpointing": False}
    alignment = {
        "beta": 0.5,
        "dataset": {"train": ["./pairs.jsonl"], "eval": ["./held.jsonl"]},
        "training": {"maxSteps": 4, "learningRate": 5e-3, "globalBatchSize": 4, "microBatchSize": 2},
    }
    gates = {"minPreferenceAccuracy": 0.0, "minRewardMargin": -1000}
    evals = {"maxSamples": 4, "maxNewTokens": 4, "gates": gates}
    doc = spec_doc(tiny_model_dir, training=training, alignment=alignment, eval=evals)
    spec = write_spec(tmp_path / "tiny.yaml", doc)
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
    phases = [x.split("phase ")[1].split(":")[0] for x in proc.stdout.splitlines() if "] phase " in x]
    assert phases == ["Pending", "Training", "Aligning", "Evaluating", "Merging", "Succeeded"], proc.stdout

    server = EmbeddedS3(str(tmp_path / "s3")).start()  # the data outlives the command
    try:
        store = S3Store("s3://sftjob/runs/local/tiny-run", client=server.client())
        assert verify_manifest(store) == []
        manifest = store.read_json("manifest.json")
        assert manifest["stages"]["align"] == "done" and manifest["metrics"]["align"]["steps"] == 4
        results = store.read_json("eval/results.json")
        trained = results["trained"]
        assert trained["preference_pairs"] == len(store.read_json("align/reference_logps.json")["eval"])
        assert 0 <= results["status"]["preferenceAccuracy"] <= 1 and results["gates_passed"]
        assert results["status"]["rewardMargin"] == pytest.approx(trained["reward_margin"])
        # the SFT result is evaluated too (a second adapter on the eval stage's one base model): a third set
        # of numbers, neither the base model's nor the aligned one's, shown in its own column
        sft = results["sft"]
        assert {"eval_loss", "exact_match", "chosen_logp_accuracy"} <= sft.keys(), sft
        assert sft["eval_loss"] not in (results["base"]["eval_loss"], trained["eval_loss"]), results
        assert "aligned vs SFT" in proc.stdout
        assert results["failed_gates"] == [] and results["gates"] == gates
        assert store.read_json("serving/serving.json")["adapter"]["uri"].endswith("/aligned/")
        merged = load_safetensors(store.get_bytes("merged/model.safetensors"))
        adapters = {
            d: load_safetensors(store.get_bytes(f"{d}/adapter_model.safetensors"))
            for d in ("aligned", "adapter")
        }
    finally:
        server.stop()

    # The local gate decision on this run's measured preference metrics (a failing gate would take a second
    # run): the eval stage checks spec.eval.gates on `metrics_of` its results, exits EVAL_GATE_FAILED naming
    # each gate that failed, and `sftjob run` prints those as Failed/EvalGateFailed (stage_run.run_stage).
    acc, margin = trained["preference_accuracy"], trained["reward_margin"]
    strict = EvalGates.model_validate({"minPreferenceAccuracy": 1.0, "minRewardMargin": margin + 0.5})
    below = [f"minPreferenceAccuracy: {acc:.4g} < 1"] if acc < 1.0 else []
    assert strict.failures(metrics_of(trained)) == [
        *below,
        f"minRewardMargin: {margin:.4g} < {margin + 0.5:.4g}",
    ]
    assert EvalGates.model_validate(gates).failures(metrics_of(trained)) == []

    # the merged model folds the aligned adapter (not the SFT one): W + (alpha / r) B A for one layer
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    lora = "base_model.model." + key.removesuffix(".weight")

    def folded(a: dict) -> torch.Tensor:
        return base[key] + 2.0 * a[f"{lora}.lora_B.weight"] @ a[f"{lora}.lora_A.weight"]

    assert torch.allclose(merged[key], folded(adapters["aligned"]), atol=1e-5)
    assert not torch.allclose(merged[key], folded(adapters["adapter"]), atol=1e-5)


def tracked_in_one_mlflow_run(server, pointer: dict, stdout: str, work: Path, results: dict) -> None:
    """Every stage of both invocations reported to the one MLflow run the first attempt created."""
    run_id = pointer["mlflowRunId"]
    assert f"MLflow run: {run_id} (experiment {pointer['mlflowExperimentId']}" in stdout
    for stage in ("train", "eval", "merge"):  # every stage reported the same run, none had to warn
        evs = [json.loads(x) for x in (work / f"{stage}.log").read_text().splitlines() if x.startswith("{")]
        assert {e["mlflowRunId"] for e in evs if e["event"] == "tracking"} == {run_id}, stage
        assert not [e for e in evs if e["event"] == "warning" and e.get("component") == "tracking"], stage
    client = server.client()
    exp = client.get_experiment_by_name("sftjob-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run across the invocations and all stages
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "local/tiny-run"
    assert run.data.tags["suite"] == "x" and run.data.tags["sftjob.name"] == "tiny-run"
    params = run.data.params
    assert params["training.maxSteps"] == "16" and params["method.type"] == "lora"
    assert params["training.learningRate"] == "0.003"  # the run's own spec, not the refused edit's
    assert params["tracking.mlflow.experiment"] == "sftjob-test" and params["dataset.format"] == "alpaca"
    history = client.get_metric_history(run_id, "train_loss")
    assert {m.step for m in history} == set(range(1, 17))  # steps of both attempts (resumed ones repeat)
    assert run.data.metrics["eval_loss"] == pytest.approx(results["trained"]["eval_loss"])
    assert run.data.metrics["base_eval_loss"] == pytest.approx(results["base"]["eval_loss"])
    assert run.data.metrics["eval_exact_match"] == pytest.approx(results["trained"]["exact_match"])
    assert "merge_max_abs_diff" in run.data.metrics and "train_final_loss" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run_id)}
    for d in ("train", "eval", "merged"):
        arts |= {a.path for a in client.list_artifacts(run_id, d)}
    assert {
        "manifest.json",
        "eval/results.json",
        "train/data_report.json",
        "merged/verification.json",
    } <= arts
