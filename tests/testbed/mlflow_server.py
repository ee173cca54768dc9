"""A real MLflow tracking server for tests: `mlflow server` (PyPI mlflow, the [dev] extra) on loopback only,
with a SQLite backend store and proxied artifacts in a temporary directory."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

from .procs import LOOPBACK, Proc, free_port, wait_until


class MlflowServer:
    def __init__(self, work_dir: Path, log_dir: Path):
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.port = free_port()
        self.uri = f"http://{LOOPBACK}:{self.port}"
        self.proc: Proc | None = None

    def start(self, timeout: float = 300.0) -> MlflowServer:
        """Start and wait (bounded) for /health. First start creates the SQLite schema: ~1 min on 2 busy cores."""
        exe = shutil.which("mlflow")
        if not exe:
            raise RuntimeError("`mlflow` not found: pip install -e '.[dev]' (it brings mlflow)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            exe,
            "server",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.work_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.work_dir / "artifacts"),
        ]
        # No background job runner (a dozen huey worker processes the tests do not need).
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = Proc(f"mlflow-{self.port}", argv, self.log_dir, env)
        proc = self.proc

        def healthy() -> bool:
            proc.check_alive()
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                return bool(r.status == 200)

        try:
            wait_until(healthy, timeout, f"mlflow server on {self.uri}", interval=0.5)
        except Exception:
            self.stop()
            raise
        return self

    def client(self):  # -> mlflow.MlflowClient
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
