"""Exit-code contract through the real launcher (torchrun), SIGTERM checkpointing, /metrics per rank."""

from __future__ import annotations

import signal
import subprocess
import urllib.request

import pytest

from sftjob_api.exit_codes import ExitCode
from sftjob_api.ports import free_port

from .runner import json_events, launch_cmd, make_config, run, trainer_env, write_config
from .test_train_dist import keys
from .tiny import dataset_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def test_bad_data_exits_permanent_naming_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"\n{"nope": 1}\n')
    term = tmp_path / "termination-log"
    cfg = make_config(tiny_model_dir, str(data), str(tmp_path / "out"), str(tmp_path / "work"))
    res = run(
        launch_cmd(write_config(str(tmp_path / "c.json"), cfg), 1, free_port()),
        trainer_env({"SFTJOB_TERMINATION_LOG": str(term)}),
    )
    assert res.returncode == ExitCode.PERMANENT, res.stderr[-3000:]
    [err] = [e for e in json_events(res.stdout) if e["event"] == "error"]
    assert f"{data}:1" in err["message"] and "malformed_json=1" in err["message"]
    assert "missing_field=1" in err["message"] and f"{data}:2" in err["message"]
    assert f"{data}:1" in term.read_text()  # what `kubectl describe pod` shows


def test_sigterm_saves_checkpoint_and_exits_retryable_with_metrics(s3, tiny_model_dir, tmp_path):
    data = write_jsonl(str(tmp_path / "d.jsonl"), dataset_rows(120, seed=2))
    port = free_port()
    cfg = make_config(
        tiny_model_dir,
        data,
        s3.uri("run/"),
        str(tmp_path / "work"),
        max_steps=200,
        checkpoint_steps=1000,
        global_batch=4,
        micro=2,
        packing=False,
    )
    cfg["runtime"]["metricsPort"] = port
    env = trainer_env({**s3.env(), "SFTJOB_METRICS_ADDR": "127.0.0.1"})
    proc = subprocess.Popen(
        launch_cmd(write_config(str(tmp_path / "c.json"), cfg), 1, free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    events, metrics_text = [], ""
    for line in proc.stdout:
        events += json_events(line)
        if events and events[-1]["event"] == "step" and events[-1]["step"] >= 2 and not metrics_text:
            metrics_text = (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            )
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == ExitCode.PREEMPTED
    steps = [e["step"] for e in events if e["event"] == "step"]
    [ckpt] = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert ckpt == steps[-1] < 200  # finished the step in flight, saved it, stopped
    assert f"checkpoints/local/step-{ckpt}/COMPLETE" in keys(s3, "run/")  # no SFTJOB_RUN_ID: run "local"
    labels = 'namespace="test",rank="0",sftjob="tiny"'
    for name in (
        "sft_train_loss",
        "sft_learning_rate",
        "sft_train_step",
        "sft_train_total_steps",
        "sft_train_epoch",
        "sft_train_tokens_total",
        "sft_train_tokens_per_second",
        "sft_train_grad_norm",
        "sft_train_eta_seconds",
        "sft_memory_used_bytes",
    ):
        assert f"{name}{{{labels}}}" in metrics_text, name
    assert f"sft_train_total_steps{{{labels}}} 200.0" in metrics_text
    assert "sft_checkpoint_save_duration_seconds_bucket" in metrics_text
