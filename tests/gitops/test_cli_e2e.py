"""`sftjob status|logs|artifacts` against a run of the operator on the test bed (real kube-apiserver, KWOK
pods, SeaweedFS S3), with a kubeconfig, as a user runs them; and as the kubectl plugin `kubectl sft`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from sftjob_operator_e2e_fixtures import Operator, apply, sftjob, wait_phase

from sftjob_api.manifest import file_entries
from sftjob_api.storage import S3Store
from sftjob_operator.cli import main

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_status_artifacts_and_logs_of_a_run(
    sftjob_crd: Any,
    namespace: str,
    operator: Operator,
    s3: Any,
    tmp_path: Path,
    capsys: Any,
    monkeypatch: Any,
) -> None:
    kube = sftjob_crd
    kube.kubectl(
        "create",
        "secret",
        "generic",
        "s3-credentials",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )
    output = {
        "uri": s3.uri("sft"),
        "endpoint": s3.endpoint_url,
        "pathStyle": True,
        "region": s3.region,
        "credentialsSecret": {"name": "s3-credentials"},
    }
    apply(kube, namespace, sftjob("cli", output=output))
    st = wait_phase(kube, namespace, "cli", ("Succeeded", "Failed"), 90, operator)
    assert st["phase"] == "Succeeded", st
    # KWOK pods run no trainer: put a run's artifacts where the status says they are.
    root = st["artifacts"]["root"]
    store = S3Store(root, s3.client())
    store.put_bytes(os.urandom(4096), "adapter/adapter_model.safetensors")
    store.put_bytes(b'{"evalLoss": 0.5}', "eval/results.json")
    files = file_entries(store)
    store.put_bytes(json.dumps({"files": files, "totalBytes": 4113, "stages": {}}).encode(), "manifest.json")

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)  # the CLI must take the keys from the run's Secret
    common = ["-n", namespace, "--kubeconfig", str(kube.kubeconfig)]

    assert main(["status", "cli", *common]) == 0
    out = capsys.readouterr().out
    assert f"{namespace}/cli: Succeeded (Succeeded)" in out and "Conditions:" in out
    assert "Merging -> Succeeded" in out and f"root: {root}" in out

    assert main(["artifacts", "cli", *common, "--download", str(tmp_path / "dl")]) == 0
    assert "every file matches manifest.json" in capsys.readouterr().out
    assert (tmp_path / "dl" / "adapter" / "adapter_model.safetensors").read_bytes() == store.get_bytes(
        "adapter/adapter_model.safetensors"
    )
    store.put_bytes(b"tampered", "eval/results.json")
    assert main(["artifacts", "cli", *common, "--download", str(tmp_path / "dl2")]) == 1
    err = capsys.readouterr().err
    assert "do not match manifest.json" in err and "eval/results.json: size/sha256 8/" in err

    # The pod is found; KWOK has no kubelet to serve its log, and the CLI says so instead of a traceback.
    rc = main(["logs", "cli", *common, "--stage", "train"])
    captured = capsys.readouterr()
    print(f"sftjob logs: rc {rc}: {captured.err.strip()}", file=sys.__stderr__)  # capsys holds stdout
    assert "==> pod cli-train-0-" in captured.err
    if rc != 0:
        assert "cannot read the logs of pod cli-train-0-" in captured.err
    assert main(["logs", "nope", *common]) == 1 and "sftjob nope not found" in capsys.readouterr().err

    # kubectl sft ...: kubectl finds the plugin on PATH and runs it with the same arguments.
    plugin_dir = tmp_path / "bin"
    plugin_dir.mkdir()
    plugin = plugin_dir / "kubectl-sft"
    # the entry point pyproject.toml declares, as pip's console-script wrapper calls it
    module, func = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][
        "kubectl-sft"
    ].split(":")
    plugin.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import sys; from {module} import {func}; sys.exit({func}())' \"$@\"\n"
    )
    plugin.chmod(0o755)
    env = {**os.environ, "PATH": f"{plugin_dir}:{os.environ['PATH']}", "KUBECONFIG": str(kube.kubeconfig)}
    r = subprocess.run(
        ["kubectl", "sft", "status", "cli", "-n", namespace],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0 and f"{namespace}/cli: Succeeded" in r.stdout, r.stdout + r.stderr
