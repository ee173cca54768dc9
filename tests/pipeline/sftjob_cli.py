"""`sftjob run` as a user types it, in a subprocess: the one place the pipeline tests spell the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CLI = [sys.executable, "-m", "sftjob_operator.cli"]


def sftjob_doc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "sft.tuning.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def write_spec(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without S3 credentials or SFTJOB_ settings: the run sees only its spec."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SFTJOB_"))}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def sftjob_run(
    spec_file: str,
    cwd: Path,
    *,
    output: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1200,
) -> subprocess.CompletedProcess[str]:
    """`sftjob run SPEC --work-dir CWD/work [--output OUTPUT]`; fails the test, with the run's output, unless it
    exits 0."""
    cmd = [*CLI, "run", spec_file, "--work-dir", str(cwd / "work")]
    if output is not None:
        cmd += ["--output", str(output)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc
