"""`sftjob status|logs|artifacts` (sftjob_operator/cluster_cli.py), the parts that need no cluster: the
status text for statuses captured from real runs, the stage `logs` picks, and the verified download."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gitops.health_table import CAPTURES, state_key
from sftjob_api.manifest import file_entries
from sftjob_api.storage import LocalStore
from sftjob_operator.cli import parser
from sftjob_operator.cluster_cli import default_stage, download_verified, format_status

CAPTURED: list[dict[str, Any]] = json.loads(CAPTURES.read_text())
NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("obj", CAPTURED, ids=lambda o: "/".join(str(x) for x in state_key(o)))
def test_status_text_for_every_captured_state(obj: dict[str, Any]) -> None:
    text = format_status(obj, [], NOW)
    st = obj.get("status") or {}
    assert text.splitlines()[0].startswith(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}: ")
    if st.get("phase"):
        assert st["phase"] in text and (st.get("reason") or "") in text
        for c in st.get("conditions") or []:
            assert c["type"] in text
    else:
        assert "is the operator running?" in text


def test_status_shows_eval_gates_and_the_latest_events() -> None:
    gated = next(o for o in CAPTURED if state_key(o)[1:3] == ("Failed", "EvalGateFailed"))
    events = [
        {"type": "Normal", "reason": f"R{i}", "message": f"m{i}", "last_timestamp": "2029-12-31T23:59:00Z"}
        for i in range(12)
    ]
    text = format_status(gated, events, NOW, last_events=3)
    assert "evalLoss  1.25" in text and "gates: FAILED: maxEvalLoss" in text
    assert "Events (last 3):" in text and "R11" in text and "R8" not in text and "60s" in text


def test_status_shows_the_mlflow_run() -> None:
    done = next(o for o in CAPTURED if state_key(o)[1] == "Succeeded")
    assert "MLflow" not in format_status(done, [], NOW)
    run = {"mlflowRunId": "0af5c3e1", "mlflowExperimentId": "7", "mlflowTrackingUri": "http://mlflow:5000"}
    tracked = {**done, "status": {**done["status"], "tracking": run}}
    assert "MLflow: run 0af5c3e1 (experiment 7) at http://mlflow:5000" in format_status(tracked, [], NOW)


def test_logs_follow_the_stage_the_run_is_in_or_failed_in() -> None:
    want = {
        "Pending": "train",
        "Training": "train",
        "Evaluating": "eval",
        "Merging": "merge",
        "EvalFailed": "eval",
        "EvalGateFailed": "eval",
        "MergeFailed": "merge",
        "TrainingFailed": "train",
        "Succeeded": "merge",
    }
    for obj in CAPTURED:
        _, phase, reason, _ = state_key(obj)
        key = reason if phase == "Failed" else phase
        if key in want and not (phase == "Succeeded" and obj["metadata"]["name"] != "happy"):
            assert default_stage(obj["status"]) == want[key], (phase, reason)


def test_download_checks_every_file_against_the_manifest(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "run"))
    store.put_bytes(b"weights" * 1000, "adapter/adapter_model.safetensors")
    store.put_bytes(b'{"evalLoss": 0.5}', "eval/results.json")
    manifest = {"files": file_entries(store)}
    assert download_verified(store, manifest, tmp_path / "ok") == []
    assert (tmp_path / "ok" / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights" * 1000
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text()) == manifest
    store.put_bytes(b"tampered", "adapter/adapter_model.safetensors")
    (problem,) = download_verified(store, manifest, tmp_path / "bad")
    assert problem.startswith("adapter/adapter_model.safetensors: size/sha256 8/")


def test_the_commands_are_registered() -> None:
    a = parser().parse_args(["logs", "run-1", "-n", "team", "--stage", "eval", "--tail", "50"])
    assert (a.cmd, a.name, a.namespace, a.stage, a.tail, a.rank) == ("logs", "run-1", "team", "eval", 50, 0)
    assert parser().parse_args(["artifacts", "run-1", "--download", "d"]).download == "d"
