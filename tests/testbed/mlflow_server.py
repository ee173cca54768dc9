"""A real MLflow tracking server for tests: `mlflow server` (PyPI mlflow[auth], the [dev] extra) on loopback
only, with a SQLite backend store and proxied artifacts in a temporary directory; optionally with MLflow's
basic-auth app (an admin user with a random password)."""

from __future__ import annotations

import secrets
import shutil
import urllib.request
from pathlib import Path

from .procs import LOOPBACK, Proc, free_port, wait_until


class MlflowServer:
    def __init__(self, work_dir: Path, log_dir: Path, basic_auth: bool = False):
        self.work_dir = work_dir
        self.basic_auth = basic_auth
        self.username = "admin"
        self.password = secrets.token_urlsafe(16)
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
        if self.basic_auth:
            ini = self.work_dir / "basic_auth.ini"
            ini.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{self.work_dir / 'basic_auth.db'}\n"
                f"admin_username = {self.username}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
            argv += ["--app-name", "basic-auth"]
            env |= {
                "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            }
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

    def credentials(self) -> dict[str, str]:
        """The environment the MLflow client reads its basic-auth credentials from."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def client(self):  # -> mlflow.MlflowClient (needs credentials() in os.environ with basic_auth)
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
