"""manifest.json against what S3 (real SeaweedFS, the `s3` fixture) actually holds."""

from __future__ import annotations

import hashlib
import json
import os

from sftjob_api import Layout, manifest
from sftjob_api.storage import S3Store


def fill(store: S3Store, tmp_path) -> None:
    big = tmp_path / "adapter_model.safetensors"
    big.write_bytes(os.urandom(3 * 2**20 + 17))
    store.put_file(str(big), "adapter/adapter_model.safetensors")
    store.put_bytes(b'{"r": 8}', "adapter/adapter_config.json")
    store.put_bytes(b"step 4 state", "checkpoints/step-4/mp_rank_00_model_states.pt")
    store.put_bytes(b'{"step": 4}', "checkpoints/step-4/COMPLETE")
    store.put_bytes(json.dumps({"steps": 4, "final_loss": 1.5, "tokens": 999}).encode(), "train/summary.json")
    store.put_bytes(
        json.dumps(
            {
                "base": {"eval_loss": 3.0},
                "trained": {"eval_loss": 2.0},
                "gates_passed": True,
                "failed_gates": [],
            }
        ).encode(),
        "eval/results.json",
    )
    store.put_bytes(b"", "eval/empty.txt")


def test_manifest_checksums_match_s3_contents(s3, tmp_path):
    prefix = "sft/team-a/run-1"
    store = S3Store(s3.uri(prefix), client=s3.client())
    fill(store, tmp_path)
    s3.client().put_object(Bucket=s3.bucket, Key="sft/team-a/run-10/adapter/x", Body=b"other run")  # not ours
    doc = manifest.write_manifest(store, {"model": {"uri": "m"}}, {"train": "done", "eval": "done"})

    client = s3.client()
    objs = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "/")["Contents"]
    by_key = {o["Key"][len(prefix) + 1 :]: o for o in objs}
    assert Layout.MANIFEST in by_key
    listed = {f["path"]: f for f in doc["files"]}
    assert set(listed) == set(by_key) - {Layout.MANIFEST}
    for key, entry in listed.items():
        body = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/{key}")["Body"].read()
        assert entry["size"] == len(body) == by_key[key]["Size"]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
    # written last
    assert by_key[Layout.MANIFEST]["LastModified"] >= max(o["LastModified"] for o in objs)

    stored = json.loads(client.get_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    assert stored["files"] == doc["files"]
    assert stored["metrics"]["train"] == {"steps": 4, "final_loss": 1.5, "tokens": 999}
    assert stored["metrics"]["eval"] == {"eval_loss": 2.0}
    assert stored["config"] == {"model": {"uri": "m"}} and "torch" in stored["versions"]
    assert stored["layout"] == {
        "checkpoints": "checkpoints/",
        "adapter": "adapter/",
        "train": "train/",
        "eval": "eval/",
    }


def test_verify_manifest_detects_a_changed_object(s3, tmp_path):
    store = S3Store(s3.uri("runs/x"), client=s3.client())
    fill(store, tmp_path)
    manifest.write_manifest(store, {}, {})
    assert manifest.verify_manifest(store) == []
    store.put_bytes(b'{"r": 16}', "adapter/adapter_config.json")
    problems = manifest.verify_manifest(store)
    assert len(problems) == 1 and problems[0].startswith("adapter/adapter_config.json:")


def test_single_object_exists_and_delete(s3):
    store = S3Store(s3.uri("runs/y"), client=s3.client())
    assert not store.exists("manifest.json")
    store.put_bytes(b"{}", "manifest.json")
    store.put_bytes(b"{}", "manifest.json.bak")
    assert store.exists("manifest.json")
    store.delete("manifest.json")
    assert not store.exists("manifest.json") and store.exists("manifest.json.bak")
