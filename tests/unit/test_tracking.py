"""spec.tracking.mlflow without a server: admission, what the pods get (credentials only from the Secret),
status.tracking from termination messages, the spec as params, and an unreachable server (docs/tracking.md).
The real tracking server is in tests/pipeline/test_tracking_mlflow.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pod_files import trainer_config_file
from testbed.procs import free_port

from sftjob_api import Layout, SpecError, Stage, parse_spec
from sftjob_api.storage import open_store
from sftjob_api.tracking import TrackingStatus, parse_tracking, tracking_message
from sftjob_api.trainer_config import TrainerConfig
from sftjob_operator.render import objects as o
from sftjob_operator.render.observe import PodObs
from sftjob_operator.render.status import tracking_status
from sftjob_trainer.tracking import HTTP_DEFAULTS, Tracker, flatten, spec_params, termination_message

SPEC: dict[str, Any] = {
    "model": {"uri": "smollm2-135m-instruct"},
    "dataset": {"train": ["s3://datasets/train.jsonl"]},
    "output": {"uri": "s3://artifacts/sft"},
}


def with_mlflow(**mlflow: Any) -> dict[str, Any]:
    return {**SPEC, "tracking": {"mlflow": {"trackingUri": "http://mlflow.example:5000", **mlflow}}}


@pytest.mark.parametrize(
    "uri",
    [
        "https://user:secret@mlflow.example",
        "http://token@mlflow.example/x",
        "file:///tmp/mlruns",
        "mlflow:5000",
    ],
)
def test_tracking_uri_refused_with_credentials_or_not_http(uri: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(with_mlflow(trackingUri=uri))
    assert any(line.startswith("spec.tracking.mlflow.trackingUri:") for line in e.value.errors), (
        e.value.errors
    )


def test_defaults() -> None:
    spec = parse_spec(with_mlflow())
    assert spec.tracking and spec.tracking.mlflow
    assert spec.tracking.mlflow.experiment == "sftjob" and spec.tracking.mlflow.credentials_secret is None
    assert parse_spec(SPEC).tracking is None


def test_credentials_reach_the_pods_from_the_secret_only() -> None:
    spec = parse_spec(with_mlflow(credentialsSecret={"name": "mlflow-creds", "tokenKey": "api-token"}))
    ref = o.SFTJobRef("tracked", "team-a", "uid-1")
    opts = o.RenderOptions()
    for job in (
        o.render_stage_job(Stage.TRAIN, ref, spec, opts),
        o.render_stage_job(Stage.EVAL, ref, spec, opts),
    ):
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        for var, key in (
            ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME"),
            ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
            ("MLFLOW_TRACKING_TOKEN", "api-token"),
        ):
            ref_ = env[var]["valueFrom"]["secretKeyRef"]
            assert ref_ == {"name": "mlflow-creds", "key": key, "optional": True} and "value" not in env[var]
    config = trainer_config_file(o.render_stage_job(Stage.TRAIN, ref, spec, opts))
    assert "mlflow-creds" in json.dumps(config)  # the Secret's name only: the trainer never reads the Secret
    assert 'MLFLOW_TRACKING_PASSWORD": "' not in json.dumps(config)
    no_secret = o.render_stage_job(Stage.TRAIN, ref, parse_spec(with_mlflow()), opts)
    names = {e["name"] for e in no_secret["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {n for n in names if n.startswith("MLFLOW_")}


def pod(message: str | None, minutes: int, stage: str = "train") -> PodObs:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return PodObs(
        name=f"p{minutes}",
        stage=stage,
        phase="Succeeded",
        created=t0 + timedelta(minutes=minutes),
        termination_message=message,
    )


def test_status_tracking_from_termination_messages() -> None:
    run = TrackingStatus(mlflow_run_id="abc", mlflow_experiment_id="3", mlflow_tracking_uri="http://m:5000")
    msg = json.dumps(tracking_message(run))
    assert parse_tracking(msg) == run
    both = json.dumps({"evalResults": {"evalLoss": 1.0}, **tracking_message(run)})
    assert parse_tracking("log line\n" + both) == run
    for bad in (
        None,
        "",
        "Traceback ...",
        '{"evalResults": {}}',
        '{"tracking": {"mlflowRunId": null}}',
        '{"tracking": {"runId": "x"}}',
    ):
        assert parse_tracking(bad) is None, bad
    newer = TrackingStatus(mlflow_run_id="def")
    prev = TrackingStatus(mlflow_run_id="old")
    pods = [pod(msg, 1), pod("OOMKilled", 5), pod(json.dumps(tracking_message(newer)), 3, "eval")]
    assert tracking_status(pods, prev) == newer  # the newest pod that reports one
    assert tracking_status([pod("error", 1), pod(None, 2)], prev) == prev  # kept when none reports
    assert tracking_status([], None) is None


def test_spec_params_are_the_whole_spec_flattened() -> None:
    doc = {"a": {"b": 1, "c": [1, 2], "d": None, "e": [{"f": "x"}, {"f": "y"}]}, "g": "z" * 7000}
    assert flatten(doc) == {"a.b": "1", "a.c": "[1, 2]", "a.e.0.f": "x", "a.e.1.f": "y", "g": "z" * 6000}
    cfg = TrainerConfig.model_validate({**with_mlflow(), "run": {"outputRoot": "/tmp/x/"}})
    params = spec_params(cfg)
    assert params["training.learningRate"] == "0.0002" and params["method.type"] == "qlora"
    assert params["tracking.mlflow.trackingUri"] == "http://mlflow.example:5000"
    assert params["dataset.train"] == '["s3://datasets/train.jsonl"]'
    assert not any(k.startswith(("run.", "runtime.")) for k in params)  # the spec only


def test_unreachable_server_warns_once_and_the_stage_goes_on(tmp_path, capsys, monkeypatch) -> None:
    for k, v in HTTP_DEFAULTS.items():
        monkeypatch.setenv(k, v)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    root = str(tmp_path / "run")
    cfg = TrainerConfig.model_validate(
        {
            **with_mlflow(trackingUri=uri),
            "output": {"uri": root},
            "run": {"outputRoot": root},
            "runtime": {"terminationLog": str(tmp_path / "term")},
        }
    )
    store = open_store(root, cfg.output)
    tracker = Tracker(cfg, store, "train")
    for step in range(1, 4):
        tracker.metrics({"train_loss": 1.0 / step}, step)
    tracker.artifact(Layout.TRAIN_SUMMARY)
    run = tracker.close(final=True)
    assert run is None
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1, events
    assert warnings[0]["component"] == "tracking" and "goes on untracked" in warnings[0]["message"]
    assert not store.exists(Layout.MLFLOW_RUN)
    termination_message(cfg, run)  # nothing to report: no termination message
    assert not (tmp_path / "term").exists()
    termination_message(cfg, run, evalResults={"evalLoss": 1.0})
    assert json.loads((tmp_path / "term").read_text()) == {"evalResults": {"evalLoss": 1.0}}


def test_not_configured_or_not_rank0_does_nothing(tmp_path) -> None:
    root = str(tmp_path / "run")
    plain = TrainerConfig.model_validate({**SPEC, "output": {"uri": root}, "run": {"outputRoot": root}})
    tracked = TrainerConfig.model_validate(
        {**with_mlflow(), "output": {"uri": root}, "run": {"outputRoot": root}}
    )
    for cfg, enabled in ((plain, True), (tracked, False)):
        t = Tracker(cfg, open_store(root), "train", enabled=enabled)
        t.metrics({"x": 1.0})
        assert not t.enabled and t.close(final=True) is None
