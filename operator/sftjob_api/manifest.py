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

from .layout import Layout, handoff
from .serving import adapter_config_problems, smallest_max_lora_rank
from .spec import SFTJobSpec
from .stage_table import Stage, stages
from .storage import Store
from .trainer_config import TrainerConfig

MANIFEST_VERSION = 1
SERVING_VERSION = 1
# Where the serving examples (examples/serving/) mount a copy of the run root; the suggested server
# arguments in serving/serving.json use it.
SERVING_MOUNT = "/mnt/run"
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
    """Each stage's outcome for a run ending at `last`: "done", "skipped" (not in stages(spec) or after
    `last`) or, for eval, "gate_failed"."""
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
    data = store.read_json(Layout.DATA_REPORT) or {}
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
    align = store.read_json(Layout.ALIGN_SUMMARY)
    if align is not None:  # the align stage ran (spec.alignment)
        metrics["align"] = {k: align.get(k) for k in ("steps", "final_loss", "final") if k in align}
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
        # the curated training data (docs/data.md): equal hashes, equal token ids and labels, same split
        "data": {
            k: data[k] for k in ("content_hash", "train_examples", "eval_examples", "mixture") if k in data
        },
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


def chat_template(store: Store, prefix: str) -> str | None:
    """The chat template saved with the tokenizer under `prefix` (chat_template.jinja or tokenizer_config)."""
    key = f"{prefix}/chat_template.jinja"
    if store.exists(key):
        return store.get_bytes(key).decode()
    template = (store.read_json(f"{prefix}/tokenizer_config.json") or {}).get("chat_template")
    return template if isinstance(template, str) else None


def server_args(cfg: TrainerConfig, artifact: str, adapter: dict[str, Any] | None) -> dict[str, Any]:
    """Suggested vLLM / TGI settings, with the run root copied to SERVING_MOUNT."""
    name, base = cfg.run.name, cfg.base_model_reference()
    served = {"adapter": base, "merged": f"{SERVING_MOUNT}/{Layout.MERGED}"}.get(
        artifact, f"{SERVING_MOUNT}/{Layout.MODEL}"
    )
    max_len = str(cfg.dataset.max_seq_length)
    if cfg.output.serving == "vllm":
        args = ["vllm", "serve", served, "--max-model-len", max_len]
        if artifact == "adapter" and adapter is not None:
            rank = str(smallest_max_lora_rank(int(adapter["r"])))
            lora = f"{name}={SERVING_MOUNT}/{Layout.ADAPTER}"
            args += ["--enable-lora", "--lora-modules", lora, "--max-lora-rank", rank]
        return {"args": args}
    if cfg.output.serving == "tgi":
        env = {"MODEL_ID": served, "MAX_INPUT_TOKENS": max_len}
        if artifact == "adapter":
            env["LORA_ADAPTERS"] = f"{name}={SERVING_MOUNT}/{Layout.ADAPTER}"
        return {"env": env}
    return {}


def serving_document(store: Store, cfg: TrainerConfig) -> dict[str, Any]:
    """serving/serving.json: what to serve and how (docs/serving.md). Pure given the store's contents."""
    root = cfg.run.output_root
    h = handoff(cfg, root)
    weights = Layout.final_weights(cfg)  # the aligned adapter when the spec aligns
    adapter_cfg = store.read_json(f"{weights}/adapter_config.json") if cfg.method.type != "full" else None
    adapter = None
    if adapter_cfg is not None:
        adapter = {
            "uri": f"{root}{weights}/",
            "r": adapter_cfg.get("r"),
            "loraAlpha": adapter_cfg.get("lora_alpha"),
            "useRslora": adapter_cfg.get("use_rslora", False),
            "useDora": adapter_cfg.get("use_dora", False),
            "targetModules": adapter_cfg.get("target_modules"),
            "modulesToSave": adapter_cfg.get("modules_to_save"),
            "baseModelNameOrPath": adapter_cfg.get("base_model_name_or_path"),
        }
    results = store.read_json(Layout.EVAL_RESULTS)
    merged = Stage.MERGE in stages(cfg)
    doc = {
        "servingVersion": SERVING_VERSION,
        "server": h.server,
        "artifact": h.artifact,
        "uri": h.uri,
        "message": h.message,
        "baseModel": {"uri": cfg.base_model_reference(), "revision": cfg.model.revision},
        "adapter": adapter,
        "merged": {"uri": cfg.merge.uri or f"{root}{Layout.MERGED}/", "dtype": cfg.merge.dtype}
        if merged
        else None,
        "chatTemplate": chat_template(store, weights),
        "maxModelLen": cfg.dataset.max_seq_length,
        "eval": {"trained": results.get("trained"), "base": results.get("base")} if results else None,
        "adapterChecks": adapter_config_problems(h.server, adapter_cfg) if adapter_cfg else [],
    }
    if h.server != "none":
        doc[h.server] = server_args(cfg, h.artifact, adapter_cfg)
    return doc


def close_run(store: Store, cfg: TrainerConfig, last: Stage, gate_failed: bool = False) -> dict[str, Any]:
    """What the final stage does last: serving/serving.json (not after a failed gate: nothing to hand off),
    then manifest.json (listing it). Returns the manifest."""
    if not gate_failed:
        doc = serving_document(store, cfg)
        store.put_bytes(json.dumps(doc, indent=1).encode(), Layout.SERVING_MANIFEST)
    states = stage_record(cfg, last, gate_failed)
    return write_manifest(store, cfg.model_dump(mode="json"), states, manifest_locations(cfg))
