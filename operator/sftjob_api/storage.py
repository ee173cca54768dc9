"""Object storage behind one small interface: S3 (boto3, retries, concurrent transfers) or a local dir.

The output location of a run can be `s3://bucket/prefix` or a filesystem path (PVC, or `sftjob run`
locally); checkpointing and artifact code only sees `Store`. S3 settings come from `spec.output` (endpoint,
pathStyle, region); credentials from the environment (the pod's Secret refs) or workload identity.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .exit_codes import PermanentError, StorageError
from .paths import safe_join
from .spec import OutputSpec

Keys = list[str]  # (`Store.list` shadows the builtin inside the classes)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @staticmethod
    def parse(uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise PermanentError(f"not an s3:// URI: {uri}")
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise PermanentError(f"S3 URI without bucket: {uri}")
        return S3Location(bucket, key)

    def join(self, *parts: str) -> S3Location:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Location(self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def addressing_style(output: OutputSpec | None) -> str:
    """spec.output.pathStyle -> boto3's addressing style (its "auto" would pick path style for any custom
    endpoint, whatever the spec says)."""
    return "path" if output is not None and output.path_style else "virtual"


def s3_client(output: OutputSpec | None = None) -> Any:
    """A boto3 client for spec.output (AWS when it names no endpoint; $AWS_ENDPOINT_URL still applies)."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"max_attempts": 8, "mode": "standard"}, s3={"addressing_style": addressing_style(output)}
    )
    endpoint = output.endpoint if output is not None else None
    region = output.region if output is not None else None
    # a session of its own: boto3's default session would keep the credentials it saw first
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(max_concurrency=8, multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20)


def _wrap(e: Exception, what: str) -> Exception:
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return PermanentError(f"{what}: {code}")
        if code in ("404", "NoSuchKey"):
            return PermanentError(f"{what}: not found")
    return StorageError(f"{what}: {e}")


def download_file(loc: S3Location, dest: str, client: Any = None) -> None:
    client = client or s3_client()
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    try:
        client.download_file(loc.bucket, loc.key, dest + ".part", Config=_transfer_config())
    except Exception as e:
        raise _wrap(e, f"download {loc}") from e
    os.replace(dest + ".part", dest)


def download_prefix(
    loc: S3Location, dest_dir: str, client: Any = None, keep: Callable[[str], bool] | None = None
) -> Keys:
    """Mirror every object under a prefix (or those whose relative path `keep` accepts) into dest_dir; files
    already there with the same size are kept."""
    client = client or s3_client()
    got = []
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/") or (keep is not None and not keep(rel)):
                    continue
                dest = safe_join(dest_dir, rel, f"S3 key s3://{loc.bucket}/{obj['Key']}")
                if not (os.path.exists(dest) and os.path.getsize(dest) == obj["Size"]):
                    download_file(S3Location(loc.bucket, obj["Key"]), dest, client)
                got.append(rel)
    except (PermanentError, StorageError):
        raise
    except Exception as e:
        raise _wrap(e, f"list {loc}") from e
    return got


class Store(abc.ABC):
    """Keys are '/'-separated paths relative to the store's root."""

    @abc.abstractmethod
    def put_file(self, local: str, key: str) -> None: ...

    @abc.abstractmethod
    def put_bytes(self, data: bytes, key: str) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def iter_bytes(self, key: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        """Stream one object's bytes."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether one object (not a prefix) exists."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Keys: ...

    @abc.abstractmethod
    def download_dir(self, prefix: str, dest: str, keep: Callable[[str], bool] | None = None) -> Keys:
        """Mirror prefix/ (only the paths relative to it that `keep` accepts, when given) into dest; returns
        the paths relative to prefix."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object if present."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    def upload_dir(self, local_dir: str, prefix: str) -> Keys:
        keys = []
        for root, _, files in os.walk(local_dir):
            for name in sorted(files):
                path = os.path.join(root, name)
                key = prefix.rstrip("/") + "/" + os.path.relpath(path, local_dir).replace(os.sep, "/")
                self.put_file(path, key)
                keys.append(key)
        return keys

    def read_json(self, key: str) -> Any:
        """The JSON document at `key`; None when it is missing or not JSON."""
        try:
            return json.loads(self.get_bytes(key))
        except Exception:
            return None


class LocalStore(Store):
    def __init__(self, root: str) -> None:
        self.root = root

    def _p(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def put_file(self, local: str, key: str) -> None:
        dest = self._p(key)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(local, dest + ".part")
        os.replace(dest + ".part", dest)

    def put_bytes(self, data: bytes, key: str) -> None:
        dest = self._p(key)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest + ".part", "wb") as f:
            f.write(data)
        os.replace(dest + ".part", dest)

    def get_bytes(self, key: str) -> bytes:
        with open(self._p(key), "rb") as f:
            return f.read()

    def iter_bytes(self, key: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        with open(self._p(key), "rb") as f:
            while block := f.read(chunk):
                yield block

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._p(key))

    def list(self, prefix: str) -> Keys:
        base = self._p(prefix.rstrip("/"))
        out = []
        for root, _, files in os.walk(base):
            for name in files:
                if not name.endswith(".part"):
                    rel = os.path.relpath(os.path.join(root, name), self.root)
                    out.append(rel.replace(os.sep, "/"))
        return sorted(out)

    def download_dir(self, prefix: str, dest: str, keep: Callable[[str], bool] | None = None) -> Keys:
        rels = []
        for k in self.list(prefix):
            rel = k[len(prefix.rstrip("/")) + 1 :]
            if keep is not None and not keep(rel):
                continue
            target = safe_join(dest, rel, f"{self.root}/{k}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(self._p(k), target)
            rels.append(rel)
        return rels

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._p(key))

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._p(prefix.rstrip("/")), ignore_errors=True)


class S3Store(Store):
    def __init__(self, uri: str, client: Any = None) -> None:
        self.loc = S3Location.parse(uri)
        self.client = client or s3_client()

    def _k(self, key: str) -> str:
        return self.loc.join(key).key

    def _uri(self, key: str) -> str:
        return f"s3://{self.loc.bucket}/{self._k(key)}"

    def put_file(self, local: str, key: str) -> None:
        try:
            self.client.upload_file(local, self.loc.bucket, self._k(key), Config=_transfer_config())
        except Exception as e:
            raise _wrap(e, f"upload {self._uri(key)}") from e

    def put_bytes(self, data: bytes, key: str) -> None:
        try:
            self.client.put_object(Bucket=self.loc.bucket, Key=self._k(key), Body=data)
        except Exception as e:
            raise _wrap(e, f"put {self._uri(key)}") from e

    def get_bytes(self, key: str) -> bytes:
        try:
            return bytes(self.client.get_object(Bucket=self.loc.bucket, Key=self._k(key))["Body"].read())
        except Exception as e:
            raise _wrap(e, f"get {self._uri(key)}") from e

    def iter_bytes(self, key: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.loc.bucket, Key=self._k(key))["Body"]
        except Exception as e:
            raise _wrap(e, f"get {self._uri(key)}") from e
        yield from body.iter_chunks(chunk)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.loc.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _wrap(e, f"head {self._uri(key)}") from e

    def list(self, prefix: str) -> Keys:
        full = self._k(prefix).rstrip("/") + "/"
        root = self.loc.key.rstrip("/") + "/" if self.loc.key else ""
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.loc.bucket, Prefix=full)
            for page in pages:
                out += [o["Key"][len(root) :] for o in page.get("Contents", [])]
        except Exception as e:
            raise _wrap(e, f"list s3://{self.loc.bucket}/{full}") from e
        return sorted(out)

    def download_dir(self, prefix: str, dest: str, keep: Callable[[str], bool] | None = None) -> Keys:
        return download_prefix(self.loc.join(prefix), dest, self.client, keep)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.loc.bucket, Key=self._k(key))
        except Exception as e:
            raise _wrap(e, f"delete {self._uri(key)}") from e

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            objs = [{"Key": self._k(k)} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.loc.bucket, Delete={"Objects": objs, "Quiet": True})


def open_store(uri: str, output: OutputSpec | None = None) -> Store:
    """The store at `uri`: S3 (client settings from `output`) or a local directory."""
    return S3Store(uri, s3_client(output)) if uri.startswith("s3://") else LocalStore(uri)
