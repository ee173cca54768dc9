"""manifest.json: every file of a run with size and sha256, written last, so its presence means "complete".

The final stage of `stages(spec)` writes it (train, eval or merge: whichever the spec ends with; eval also
when a gate fails, since nothing runs after it), in a cluster and under `sftjob run` alike; `sftjob run`
writes it once more after adding report/ so the manifest stays the last object and lists the report.

The manifest is built from what the store actually holds (each object is streamed back and hashed).
Uploads go through `storage.Store` (S3: boto3 managed transfers, multipart above 64 MiB with 8 concurrent
parts, botocore "standard" retries with 8 attempts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import sys
import time
from importlib import metadata
from typing import Any

from .layout import Layout, Stage, stages
from .spec import SFTJobSpec
from .storage import Store

MANIFEST_VERSION = 1
PACKAGES = (
    "sftjob",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "safetensors",
    "tokenizers",
)


def hash_object(store: Store, key: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    for block in store.iter_bytes(key):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def file_entries(store: Store) -> list[dict[str, Any]]:
    """Every object under the layout's prefixes (not the manifest itself), with size and sha256."""
    keys: list[str] = []
    for prefix in Layout.PREFIXES:
        keys += [k for k in store.list(prefix) if not k.endswith("/")]
    out = []
    for key in sorted(set(keys)):
        size, sha = hash_object(store, key)
        out.append({"path": key, "size": size, "sha256": sha})
    return out


def stage_record(spec: SFTJobSpec, last: Stage, gate_failed: bool = False) -> dict[str, str]:
    """{"train": "done", "eval": "done" | "gate_failed" | "skipped", "merge": ...} for a run ending at `last`."""
    runs = stages(spec)
    out: dict[str, str] = {}
    for stage in Stage:
        if stage not in runs or runs.index(stage) > runs.index(last):
            out[stage] = "skipped"
        elif stage == Stage.EVAL and gate_failed:
            out[stage] = "gate_failed"
        else:
            out[stage] = "done"
    return out


def manifest_locations(spec: SFTJobSpec) -> dict[str, str]:
    """Artifacts outside the run root: the merged model when spec.merge.uri puts it elsewhere."""
    if Stage.MERGE in stages(spec) and spec.merge.uri:
        return {"merged": spec.merge.uri}
    return {}


def build_manifest(
    store: Store,
    config: dict[str, Any],
    stage_states: dict[str, str],
    extra_locations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest document: pure given the store's contents (plus the clock and installed versions)."""
    files = file_entries(store)
    train = store.read_json(Layout.TRAIN_SUMMARY) or {}
    results = store.read_json(Layout.EVAL_RESULTS) or {}
    merged = store.read_json(Layout.MERGE_VERIFICATION) or {}
    metrics = {
        "train": {k: train.get(k) for k in ("steps", "final_loss", "tokens") if k in train},
        "eval": results.get("trained"),
        "eval_base": results.get("base"),
        "gates_passed": results.get("gates_passed"),
        "failed_gates": results.get("failed_gates"),
        "merge_verification": {
            k: merged.get(k) for k in ("max_abs_diff", "tolerance", "passed") if k in merged
        },
    }
    return {
        "manifestVersion": MANIFEST_VERSION,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": stage_states,
        "layout": {d: f"{d}/" for d in Layout.PREFIXES if any(f["path"].startswith(d + "/") for f in files)},
        "locations": extra_locations or {},
        "files": files,
        "totalBytes": sum(f["size"] for f in files),
        "config": config,
        "versions": versions(),
        "metrics": metrics,
        "argv": sys.argv,
    }


def write_manifest(
    store: Store,
    config: dict[str, Any],
    stage_states: dict[str, str],
    extra_locations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build and write manifest.json as the run's last object; returns it."""
    doc = build_manifest(store, config, stage_states, extra_locations)
    store.put_bytes(json.dumps(doc, indent=1, sort_keys=False).encode(), Layout.MANIFEST)
    return doc


def verify_manifest(store: Store, doc: dict[str, Any] | None = None) -> list[str]:
    """Problems found when checking every manifest entry against the store (empty list: all good)."""
    doc = doc if doc is not None else json.loads(store.get_bytes(Layout.MANIFEST))
    problems = []
    for f in doc["files"]:
        try:
            size, sha = hash_object(store, f["path"])
        except Exception as e:
            problems.append(f"{f['path']}: unreadable ({e})")
            continue
        if size != f["size"] or sha != f["sha256"]:
            problems.append(
                f"{f['path']}: size/sha256 {size}/{sha[:12]} != manifest {f['size']}/{f['sha256'][:12]}"
            )
    return problems
