"""The artifact layout of one run and its manifest (written last, so its presence means "complete").

Under the run's output root `<output.uri>/<namespace>/<name>/`:

    checkpoints/step-N/...   resumable DeepSpeed checkpoints, each with a COMPLETE marker (train stage)
    adapter/                 the trained LoRA adapter + tokenizer (lora, qlora)       (train stage)
    model/                   the trained full model + tokenizer (method full)         (train stage)
    train/                   summary.json (steps, final loss, tokens), data_report.json (train stage)
    eval/                    results.json, samples.jsonl                              (eval stage)
    merged/                  safetensors + tokenizer + generation config, verification.json (merge stage)
    report/                  report.md, loss_curve.png                                (`sftjob run` only)
    manifest.json            every file above with size and sha256, the config, versions, metrics

Uploads go through `storage.Store` (S3: boto3 managed transfers, multipart above 64 MiB with 8 concurrent
parts, botocore "standard" retries with 8 attempts). The manifest is built from what the store actually
holds (each object is streamed back and hashed), then written as the last object of the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from .storage import LocalStore, S3Store, Store

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"
TRAIN = "train"
EVAL = "eval"
MERGED = "merged"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
REPORT = "report"
LAYOUT = (CHECKPOINTS, ADAPTER, MODEL, TRAIN, EVAL, MERGED, REPORT)
PACKAGES = ("sftjob", "torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "safetensors",
            "tokenizers")


def iter_object(store: Store, key: str, chunk: int = 8 << 20) -> Iterator[bytes]:
    """Stream one object's bytes from the store."""
    if isinstance(store, LocalStore):
        with open(os.path.join(store.root, *key.split("/")), "rb") as f:
            while block := f.read(chunk):
                yield block
    elif isinstance(store, S3Store):
        body = store.client.get_object(Bucket=store.loc.bucket, Key=store.loc.join(key).key)["Body"]
        yield from body.iter_chunks(chunk)
    else:
        yield store.get_bytes(key)


def hash_object(store: Store, key: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    for block in iter_object(store, key):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def exists(store: Store, key: str) -> bool:
    """Whether one object (not a prefix) exists; `Store.list` only lists prefixes."""
    if isinstance(store, LocalStore):
        return os.path.isfile(os.path.join(store.root, *key.split("/")))
    if isinstance(store, S3Store):
        try:
            store.client.head_object(Bucket=store.loc.bucket, Key=store.loc.join(key).key)
            return True
        except Exception:
            return False
    try:
        store.get_bytes(key)
        return True
    except Exception:
        return False


def delete_key(store: Store, key: str) -> None:
    """Delete one object if present."""
    if isinstance(store, LocalStore):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(store.root, *key.split("/")))
    elif isinstance(store, S3Store):
        store.client.delete_object(Bucket=store.loc.bucket, Key=store.loc.join(key).key)
    else:
        raise NotImplementedError(type(store).__name__)


def read_json(store: Store, key: str) -> Any:
    try:
        return json.loads(store.get_bytes(key))
    except Exception:
        return None


def file_entries(store: Store) -> list[dict[str, Any]]:
    """Every object under the layout's prefixes (not the manifest itself), with size and sha256."""
    keys: list[str] = []
    for prefix in LAYOUT:
        keys += [k for k in store.list(prefix) if not k.endswith("/")]
    out = []
    for key in sorted(set(keys)):
        size, sha = hash_object(store, key)
        out.append({"path": key, "size": size, "sha256": sha})
    return out


def build_manifest(store: Store, config: dict[str, Any], stages: dict[str, str],
                   extra_locations: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest document: pure given the store's contents (plus the clock and installed versions)."""
    files = file_entries(store)
    train = read_json(store, f"{TRAIN}/summary.json") or {}
    results = read_json(store, f"{EVAL}/results.json") or {}
    merged = read_json(store, f"{MERGED}/verification.json") or {}
    metrics = {
        "train": {k: train.get(k) for k in ("steps", "final_loss", "tokens") if k in train},
        "eval": results.get("trained"),
        "eval_base": results.get("base"),
        "gates_passed": results.get("gates_passed"),
        "failed_gates": results.get("failed_gates"),
        "merge_verification": {k: merged.get(k) for k in ("max_abs_diff", "tolerance", "passed") if k in merged},
    }
    return {
        "manifestVersion": MANIFEST_VERSION,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": stages,
        "layout": {d: f"{d}/" for d in LAYOUT if any(f["path"].startswith(d + "/") for f in files)},
        "locations": extra_locations or {},
        "files": files,
        "totalBytes": sum(f["size"] for f in files),
        "config": config,
        "versions": versions(),
        "metrics": metrics,
        "argv": sys.argv,
    }


def write_manifest(store: Store, config: dict[str, Any], stages: dict[str, str],
                   extra_locations: dict[str, str] | None = None) -> dict[str, Any]:
    """Build and write manifest.json as the run's last object; returns it."""
    doc = build_manifest(store, config, stages, extra_locations)
    store.put_bytes(json.dumps(doc, indent=1, sort_keys=False).encode(), MANIFEST)
    return doc


def verify_manifest(store: Store, doc: dict[str, Any] | None = None) -> list[str]:
    """Problems found when checking every manifest entry against the store (empty list: all good)."""
    doc = doc if doc is not None else json.loads(store.get_bytes(MANIFEST))
    problems = []
    for f in doc["files"]:
        try:
            size, sha = hash_object(store, f["path"])
        except Exception as e:
            problems.append(f"{f['path']}: unreadable ({e})")
            continue
        if size != f["size"] or sha != f["sha256"]:
            problems.append(f"{f['path']}: size/sha256 {size}/{sha[:12]} != manifest {f['size']}/{f['sha256'][:12]}")
    return problems


def config_dump(cfg: Any) -> dict[str, Any]:
    return dict(cfg.model_dump(mode="json", by_alias=True))
