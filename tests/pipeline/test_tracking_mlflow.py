"""spec.tracking.mlflow: an unreachable server only warns; credentials come from the environment against a
real basic-auth MLflow server. One MLflow run across every stage of an interrupted and resumed `sftjob run`:
tests/pipeline/test_sftjob_run.py (it shares that run). See docs/tracking.md."""

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
from pipeline.test_sftjob_run import spec_doc

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(1500)]


def events(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]


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
