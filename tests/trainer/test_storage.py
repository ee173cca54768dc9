"""Store (S3 via the real SeaweedFS fixture, and local) and checkpoint discovery on a real listing."""

from __future__ import annotations

import pytest

from sftjob_api.exit_codes import PermanentError
from sftjob_api.storage import LocalStore, S3Store, Store
from sftjob_trainer.model import resolve_dir
from sftjob_trainer.records import DropReport, iter_rows


def exercise(store: Store, tmp_path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"A" * 10)
    (src / "sub" / "b.bin").write_bytes(b"B")
    assert store.upload_dir(str(src), "checkpoints/step-3") == [
        "checkpoints/step-3/a.bin",
        "checkpoints/step-3/sub/b.bin",
    ]
    store.put_bytes(b"{}", "checkpoints/step-3/COMPLETE")
    store.put_bytes(b"x", "checkpoints/step-7/a.bin")  # newer but incomplete
    assert store.exists("checkpoints/step-3/COMPLETE") and not store.exists("checkpoints/step-3")
    assert b"".join(store.iter_bytes("checkpoints/step-3/a.bin", chunk=3)) == b"A" * 10
    got = store.download_dir("checkpoints/step-3", str(tmp_path / "dl"))
    assert "COMPLETE" in got and "sub/b.bin" in got
    assert (tmp_path / "dl" / "sub" / "b.bin").read_bytes() == b"B"
    only = store.download_dir(
        "checkpoints/step-3", str(tmp_path / "only"), keep=lambda rel: rel.startswith("sub/")
    )
    assert only == ["sub/b.bin"] and not (tmp_path / "only" / "a.bin").exists()
    assert store.get_bytes("checkpoints/step-3/a.bin") == b"A" * 10
    store.delete_prefix("checkpoints/step-7")
    assert all("step-7" not in k for k in store.list("checkpoints"))
    store.delete("checkpoints/step-3/COMPLETE")
    store.delete("checkpoints/step-3/COMPLETE")  # deleting what is gone is fine
    assert not store.exists("checkpoints/step-3/COMPLETE")


def test_s3_store(s3, tmp_path, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    exercise(S3Store(s3.uri("runs/ns/job/")), tmp_path)


def test_local_store(tmp_path):
    exercise(LocalStore(str(tmp_path / "out")), tmp_path)


def test_s3_data_and_model_prefix_download(s3, tmp_path, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="data/train.jsonl", Body=b'{"a": 1}\nnot json\n')
    rep = DropReport()
    rows = list(iter_rows([s3.uri("data/train.jsonl")], rep, str(tmp_path / "cache")))
    assert [r.data for r in rows] == [{"a": 1}]
    assert rep.examples["malformed_json"][0].startswith(s3.uri("data/train.jsonl") + ":2")
    c.put_object(Bucket=s3.bucket, Key="models/m/config.json", Body=b"{}")
    c.put_object(Bucket=s3.bucket, Key="models/m/w.safetensors", Body=b"123")
    d = resolve_dir(s3.uri("models/m"), str(tmp_path / "models"))
    assert sorted(p.name for p in __import__("pathlib").Path(d).iterdir()) == [
        ".sftjob-complete",
        "config.json",
        "w.safetensors",
    ]
    with pytest.raises(PermanentError, match="no model files"):
        resolve_dir(s3.uri("models/missing"), str(tmp_path / "models"))
