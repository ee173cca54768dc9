"""Safe paths (issue 25, item 5): a name someone else chose — an S3 key, a manifest entry, a namespace —
never makes a download or `sftjob run --fresh` write or delete outside its directory. Real SeaweedFS for the
S3 store, real files and symlinks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sftjob_api.paths import UnsafePath, safe_join
from sftjob_api.storage import S3Location, S3Store, download_prefix
from sftjob_operator.cluster_cli import CliError, download_verified
from sftjob_operator.local.runner import Options, run


def test_safe_join_refuses_absolute_dotdot_and_symlink_escapes(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    assert safe_join(dest, "adapter/model.safetensors", "k") == str(dest / "adapter/model.safetensors")
    assert safe_join(dest, "a/./b..c", "k") == os.path.join(dest, "a/./b..c")  # dots inside a name: fine
    # what download_prefix saw for key "p//abs/x" under prefix "p/", and plain absolute paths
    for rel in ("/abs/x", "\\abs\\x", ""):
        with pytest.raises(UnsafePath, match=r"S3 key s3://b/p//abs/x: .* is an absolute or empty path"):
            safe_join(dest, rel, "S3 key s3://b/p//abs/x")
    for rel in ("../x", "a/../../x", "a/..", "..\\x"):
        with pytest.raises(UnsafePath, match=r"contains '\.\.'"):
            safe_join(dest, rel, "k")
    (dest / "link").symlink_to(tmp_path)  # a symlink already in the destination
    with pytest.raises(UnsafePath, match=r"'link/x' resolves to .*, outside"):
        safe_join(dest, "link/x", "k")


def test_download_prefix_mirrors_a_real_bucket_through_safe_join(s3, tmp_path: Path) -> None:
    # SeaweedFS refuses keys with '..' parts (InvalidRequest) and folds '//' into '/', so the escaping keys
    # cannot be planted here; AWS S3 stores them as given (the safe_join test above covers them).
    client = s3.client()
    for key in ("p/config.json", "p/sub/weights.bin", "p/..x/odd-but-safe"):
        client.put_object(Bucket=s3.bucket, Key=key, Body=key.encode())
    got = download_prefix(S3Location(s3.bucket, "p"), str(tmp_path / "d"), client)
    assert sorted(got) == ["..x/odd-but-safe", "config.json", "sub/weights.bin"]
    assert (tmp_path / "d" / "..x" / "odd-but-safe").read_bytes() == b"p/..x/odd-but-safe"


def test_artifacts_download_refuses_a_manifest_path_outside_before_writing(s3, tmp_path: Path) -> None:
    # ~1 s. The manifest is tenant-writable JSON: the old download opened dest/<path> for writing first
    # (pathlib: dest / "/abs" is "/abs"), so both files below were created outside dest.
    outside = tmp_path / "outside"
    store = S3Store(s3.uri("team-a/run"), client=s3.client())
    store.put_bytes(b"payload", "ok.txt")
    store.put_bytes(b"payload", str(outside / "abs.txt"))  # the key the absolute entry is read from
    entry = {"size": 7, "sha256": "239f59ed55e737c77147cf55ad0c1b030b6d7ee748a7426952f9b852d5a935e5"}
    for bad in (str(outside / "abs.txt"), "../outside/dotdot.txt"):
        manifest = {"files": [{"path": "ok.txt", **entry}, {"path": bad, **entry}]}
        store.put_bytes(json.dumps(manifest).encode(), "manifest.json")
        dest = tmp_path / "dest"
        with pytest.raises(CliError, match=rf"refusing to download: manifest.json files\[\]\.path: '{bad}'"):
            download_verified(store, json.loads(store.get_bytes("manifest.json")), dest)
        assert not outside.exists() and not dest.exists()  # nothing written, not even the good file


def spec_file(tmp_path: Path, namespace: str) -> Path:
    (tmp_path / "model").mkdir()
    doc = {
        "apiVersion": "sft.tuning.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "run", "namespace": namespace},
        "spec": {
            "model": {"uri": "./model"},
            "dataset": {"train": ["./train.jsonl"]},
            "output": {"uri": "./out"},
        },
    }
    path = tmp_path / "sftjob.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_sftjob_run_refuses_a_namespace_that_is_not_a_dns_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--fresh` removes ~/.cache/sftjob/runs/<namespace>/<name>: with namespace "../victim" that was
    # ~/.cache/sftjob/victim/run, someone else's directory.
    monkeypatch.setenv("HOME", str(tmp_path))
    victim = tmp_path / ".cache" / "sftjob" / "victim" / "run"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    rc = run(Options(spec_path=str(spec_file(tmp_path, "../victim")), fresh=True, echo=lambda s: None))
    err = capsys.readouterr().err
    assert rc != 0
    assert "metadata.namespace: String should match pattern" in err, err
    assert (victim / "keep.txt").read_text() == "mine"
    assert not os.path.exists(tmp_path / "out")
