"""Smoke tests proving the S3 fixture is a real SeaweedFS server (no cluster needed)."""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest
from botocore.exceptions import ClientError

pytestmark = pytest.mark.e2e

PART = 5 * 1024 * 1024 + 123  # above S3's 5 MiB minimum part size


def test_multipart_upload_and_read_back(s3):
    client = s3.client()
    parts_data = [os.urandom(PART), os.urandom(PART), os.urandom(1000)]
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key="ckpt/model.bin")
    parts = []
    for number, data in enumerate(parts_data, start=1):
        r = client.upload_part(
            Bucket=s3.bucket, Key="ckpt/model.bin", PartNumber=number, UploadId=upload["UploadId"], Body=data
        )
        parts.append({"PartNumber": number, "ETag": r["ETag"]})
    client.complete_multipart_upload(
        Bucket=s3.bucket, Key="ckpt/model.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )

    body = client.get_object(Bucket=s3.bucket, Key="ckpt/model.bin")["Body"].read()
    assert len(body) == 2 * PART + 1000
    assert hashlib.sha256(body).digest() == hashlib.sha256(b"".join(parts_data)).digest()
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="ckpt/")
    assert [o["Key"] for o in listed["Contents"]] == ["ckpt/model.bin"]


def test_each_test_gets_a_fresh_empty_bucket(s3):
    assert s3.client().list_objects_v2(Bucket=s3.bucket).get("KeyCount", 0) == 0
    assert s3.uri("a/b") == f"s3://{s3.bucket}/a/b"


def test_env_works_for_a_plain_boto3_client(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")  # endpoint, keys and region all from the environment
    client.put_object(Bucket=s3.bucket, Key="x", Body=b"hello")
    assert client.get_object(Bucket=s3.bucket, Key="x")["Body"].read() == b"hello"


def test_wrong_credentials_are_rejected(s3):
    from testbed.seaweed import make_client

    bad = make_client(s3.endpoint_url, s3.access_key, "not-the-secret", s3.region)
    with pytest.raises(ClientError):
        bad.put_object(Bucket=s3.bucket, Key="x", Body=b"nope")
