"""spec.output.pathStyle end to end: the operator renders it into the trainer config, the trainer opens its
store from that config, and boto3 addresses the bucket as the spec says (it once had no effect: the store
chose path style whenever an endpoint was set)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pod_files import trainer_config_file

from sftjob_api import Stage, parse_spec
from sftjob_api.storage import S3Store, open_store
from sftjob_api.trainer_config import TrainerConfig
from sftjob_operator.render import objects as o

AWS_KEYS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}


def spec_with(output: dict[str, Any]) -> Any:
    return parse_spec(
        {
            "model": {"uri": "s3://models/m"},
            "dataset": {"train": ["s3://data/train.jsonl"]},
            "output": {"uri": "s3://artifacts/runs", **output},
        }
    )


def trainer_store(output: dict[str, Any]) -> S3Store:
    """What the trainer in the pod opens: the config file the operator renders, parsed as the trainer does."""
    ref = o.SFTJobRef("run", "team-a", "uid-1")
    rendered = trainer_config_file(o.render_stage_job(Stage.TRAIN, ref, spec_with(output), o.RenderOptions()))
    cfg = TrainerConfig.model_validate(json.loads(rendered))
    store = open_store(cfg.run.output_root, cfg.output)
    assert isinstance(store, S3Store)
    return store


def object_url(store: S3Store) -> str:
    return str(store.client.generate_presigned_url("get_object", Params={"Bucket": "artifacts", "Key": "k"}))


@pytest.mark.parametrize(
    ("output", "style", "url"),
    [
        (
            {"endpoint": "http://minio.example:9000", "pathStyle": True},
            "path",
            "http://minio.example:9000/artifacts/k",
        ),
        (
            {"endpoint": "http://minio.example:9000", "pathStyle": False},
            "virtual",
            "http://artifacts.minio.example:9000/k",
        ),
        ({"pathStyle": True}, "path", "https://s3.us-west-2.amazonaws.com/artifacts/k"),
        ({}, "virtual", "https://artifacts.s3.us-west-2.amazonaws.com/k"),
    ],
    ids=["endpoint-path", "endpoint-virtual", "aws-path", "aws-virtual"],
)
def test_path_style_reaches_the_trainers_s3_client(monkeypatch, output, style, url):
    for k, v in AWS_KEYS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    store = trainer_store({**output, "region": "us-west-2"})
    assert store.client.meta.config.s3["addressing_style"] == style
    assert object_url(store).startswith(url + "?")
    assert store.client.meta.region_name == "us-west-2"  # spec.output.region, not the environment's


def test_only_credentials_travel_as_environment():
    """Endpoint, region and path style are in the config: the pod's env has no S3 settings besides the keys."""
    spec = spec_with({"endpoint": "http://minio.example:9000", "pathStyle": True, "region": "eu-west-1"})
    job = o.render_stage_job(Stage.TRAIN, o.SFTJobRef("run", "team-a", "uid-1"), spec, o.RenderOptions())
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {"AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "SFTJOB_S3_PATH_STYLE"} & env


def test_upload_to_seaweedfs_with_path_style(s3, monkeypatch):
    """A real upload through a host-name endpoint (where boto3 could address the bucket either way): the
    requests go to /bucket/key and the object arrives."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    endpoint = s3.endpoint_url.replace("127.0.0.1", "localhost")
    spec = spec_with({"endpoint": endpoint, "pathStyle": True})
    store = open_store(f"s3://{s3.bucket}/runs/team-a/run/", spec.output)
    urls: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: urls.append(request.url))
    store.put_bytes(b"hello", "train/summary.json")
    assert urls and all(u.startswith(f"{endpoint}/{s3.bucket}/") for u in urls), urls
    body = s3.client().get_object(Bucket=s3.bucket, Key="runs/team-a/run/train/summary.json")["Body"].read()
    assert body == b"hello"
