"""Secrets (issue 14, part 7), trainer side: the S3 credentials the trainer gets from its environment (the
Secret, through secretKeyRef) never appear in its logs (stdout events, stderr), its termination message,
its /metrics, or anything it writes to S3 (manifest, reports, summaries) — on success and when S3 refuses
the credentials."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest

from sftjob_api.exit_codes import ExitCode
from sftjob_api.ports import free_port

from .runner import json_events, launch_cmd, make_config, trainer_env, write_config
from .tiny import dataset_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(600)]

TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".yaml", ".md", "COMPLETE")


def _run(cfg_path: str, env: dict[str, str], port: int) -> tuple[int, str, str]:
    """Run the launcher; scrape its /metrics at the first step event (empty when it never gets there)."""
    proc = subprocess.Popen(
        launch_cmd(cfg_path, 1, free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, metrics = [], ""
    for line in proc.stdout:
        out.append(line)
        if not metrics and any(e["event"] == "step" for e in json_events(line)):
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    err = proc.stderr.read()
    return proc.wait(timeout=300), "".join(out) + err, metrics


def test_credentials_never_logged_written_or_exported(s3, tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(str(tmp_path / "d.jsonl"), dataset_rows(40, seed=3))
    port = free_port()
    cfg = make_config(
        tiny_model_dir, data, s3.uri("run/"), str(tmp_path / "work"), max_steps=4, checkpoint_steps=2
    )
    cfg["runtime"]["metricsPort"] = port
    term = tmp_path / "termination-log"
    env = trainer_env({**s3.env(), "SFTJOB_METRICS_ADDR": "127.0.0.1", "SFTJOB_TERMINATION_LOG": str(term)})
    rc, logs, metrics = _run(write_config(str(tmp_path / "c.json"), cfg), env, port)
    assert rc == ExitCode.OK, logs[-3000:]
    assert metrics, "no /metrics scraped"
    client = s3.client()
    written = []
    for obj in client.list_objects_v2(Bucket=s3.bucket, Prefix="run/").get("Contents", []):
        if obj["Key"].endswith(TEXT_SUFFIXES):
            written.append(client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read().decode())
    assert written  # the run's reports, summaries and COMPLETE markers
    places = {"logs": logs, "metrics": metrics, "S3 text objects": "\n".join(written)}
    for where, text in places.items():
        assert s3.access_key not in text and s3.secret_key not in text, f"a credential value in the {where}"

    # S3 refuses a wrong secret: the error says so, and still carries neither value
    wrong = "wrong-" + s3.secret_key[::-1]
    bad_env = {**env, "AWS_SECRET_ACCESS_KEY": wrong}
    cfg["output"]["uri"] = s3.uri("run2/")
    rc, logs, _ = _run(write_config(str(tmp_path / "c2.json"), cfg), bad_env, port)
    assert rc != ExitCode.OK
    failure = logs + (term.read_text() if term.exists() else "")
    assert wrong not in failure and s3.secret_key not in failure, failure[-3000:]
