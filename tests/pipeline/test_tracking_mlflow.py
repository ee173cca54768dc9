"""spec.tracking.mlflow against a real MLflow tracking server on loopback (testbed.mlflow_server): a real
`sftjob run` on the tiny model, interrupted and resumed, logs into one MLflow run from every stage; an
unreachable server only warns. See docs/tracking.md."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from testbed.mlflow_server import MlflowServer
from testbed.procs import free_port

from pipeline.sftjob_cli import CLI, write_spec
from pipeline.test_sftjob_run import sigint_after_step, spec_doc

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, testbed_logs: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), testbed_logs).start()
    yield server
    server.stop()


def events(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]


def test_run_is_tracked_in_one_mlflow_run_across_stages_and_resume(tiny_model_dir, tmp_path, mlflow_server):
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(120, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(8, seed=2))
    training = {
        "maxSteps": 8,
        "learningRate": 3e-3,
        "globalBatchSize": 4,
        "microBatchSize": 2,
        "gradientCheckpointing": False,
        "checkpointSteps": 2,
    }
    tracking = {
        "mlflow": {"trackingUri": mlflow_server.uri, "experiment": "sftjob-test", "tags": {"suite": "x"}}
    }
    spec = write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, training=training, tracking=tracking))
    work = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*CLI, "run", spec, "--work-dir", str(work)]

    sigint_after_step(cmd, tmp_path, env, work)
    root = tmp_path / "runs" / "local" / "tiny-run"
    pointer = json.loads((root / "tracking" / "mlflow.json").read_text())
    run_id = pointer["mlflowRunId"]
    assert pointer["mlflowTrackingUri"] == mlflow_server.uri

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from step 3" in second.stdout  # SIGTERM came while the trainer was held after step 2
    assert f"MLflow run: {run_id} (experiment {pointer['mlflowExperimentId']}" in second.stdout
    for stage in ("train", "eval", "merge"):  # every stage reported the same run, none had to warn
        evs = events(work / f"{stage}.log")
        assert {e["mlflowRunId"] for e in evs if e["event"] == "tracking"} == {run_id}, stage
        assert not [e for e in evs if e["event"] == "warning" and e.get("component") == "tracking"], stage

    client = mlflow_server.client()
    exp = client.get_experiment_by_name("sftjob-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run across both invocations and all stages
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "local/tiny-run"
    assert run.data.tags["suite"] == "x" and run.data.tags["sftjob.name"] == "tiny-run"
    params = run.data.params
    assert params["training.maxSteps"] == "8" and params["method.type"] == "lora"
    assert params["tracking.mlflow.experiment"] == "sftjob-test" and params["dataset.format"] == "alpaca"
    history = client.get_metric_history(run_id, "train_loss")
    assert {m.step for m in history} == set(range(1, 9))  # steps of both attempts (resumed ones repeat)
    results = json.loads((root / "eval" / "results.json").read_text())
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
    logged = json.loads(Path(client.download_artifacts(run_id, "manifest.json", str(tmp_path))).read_text())
    assert "tracking/mlflow.json" in {f["path"] for f in logged["files"]}


def test_unreachable_server_warns_and_the_run_succeeds(tiny_model_dir, tmp_path):
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(40, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(4, seed=2))
    training = {"maxSteps": 2, "globalBatchSize": 4, "microBatchSize": 2, "gradientCheckpointing": False}
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    doc = spec_doc(
        tiny_model_dir,
        training=training,
        eval={"enabled": False},
        merge={"enabled": False},
        tracking={"mlflow": {"trackingUri": dead}},
    )
    spec = write_spec(tmp_path / "tiny.yaml", doc)
    work = tmp_path / "work"
    proc = subprocess.run(
        [*CLI, "run", spec, "--work-dir", str(work)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "phase Succeeded" in proc.stdout and f"MLflow: no run recorded at {dead}" in proc.stdout
    warnings = [e for e in events(work / "train.log") if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["component"] == "tracking", warnings
    root = tmp_path / "runs" / "local" / "tiny-run"
    assert (root / "manifest.json").exists() and not (root / "tracking").exists()


@pytest.fixture(scope="module")
def mlflow_auth_server(
    tmp_path_factory: pytest.TempPathFactory, testbed_logs: Path
) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), testbed_logs, basic_auth=True).start()
    yield server
    server.stop()


def test_credentials_come_from_the_environment_and_a_wrong_one_only_warns(
    tmp_path, mlflow_auth_server, monkeypatch, capsys
):
    """MLflow's basic-auth server: the trainer's client authenticates with MLFLOW_TRACKING_USERNAME/PASSWORD
    (what the pods get from credentialsSecret); a wrong password is one warning, and no log line holds it."""
    from sftjob_api.storage import open_store
    from sftjob_api.trainer_config import TrainerConfig
    from sftjob_trainer.tracking import HTTP_DEFAULTS, Tracker

    srv = mlflow_auth_server
    for k, v in HTTP_DEFAULTS.items():
        monkeypatch.setenv(k, v)
    root = str(tmp_path / "run")
    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": "smollm2-135m-instruct"},
            "dataset": {"train": ["/data/train.jsonl"]},
            "output": {"uri": root},
            "run": {"namespace": "team-a", "name": "auth", "outputRoot": root},
            "tracking": {"mlflow": {"trackingUri": srv.uri, "experiment": "auth"}},
        }
    )
    wrong = "not-the-Password-42"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", srv.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    tracker = Tracker(cfg, open_store(root), "train")
    tracker.metrics({"train_loss": 1.0}, 1)
    assert tracker.close(final=True) is None
    out = capsys.readouterr().out
    warnings = [json.loads(x) for x in out.splitlines() if x.startswith("{") and '"warning"' in x]
    assert len(warnings) == 1 and warnings[0]["component"] == "tracking", out
    assert wrong not in out and srv.password not in out

    for k, v in srv.credentials().items():
        monkeypatch.setenv(k, v)
    tracker = Tracker(cfg, open_store(root), "train")
    tracker.metrics({"train_loss": 0.5}, 1)
    run = tracker.close(final=True)
    assert run is not None and run.mlflow_run_id
    got = srv.client().get_run(run.mlflow_run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "team-a/auth"
    assert got.data.params["tracking.mlflow.experiment"] == "auth" and got.data.metrics["train_loss"] == 0.5
    assert srv.password not in capsys.readouterr().out
