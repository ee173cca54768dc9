"""The serving hand-off on real runs: serving/serving.json next to the artifacts (listed in a manifest that
verifies), adapter_config.json naming the spec's base model (never the trainer's local copy), and the merged
model handed off when the server cannot load the adapter (DoRA for vLLM).

- the README's real model (SmolLM2-135M-Instruct, a model-cache name), serving vllm: the README example's
  own run on the real node through the operator (tests/node/test_real_node_e2e.py);
- the tiny Llama through `sftjob run` with DoRA, serving vllm: the merged model is the hand-off;
- the train pod as the operator renders it (tests/pipeline/test_train_only.py) against real S3, train-only,
  serving tgi: the train stage writes the serving manifest.
vLLM and TGI do not install on this CPU-only machine: loadability is checked with peft (the merge stage loads
base + adapter) and the servers' documented rules applied to the written adapter_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sftjob_api import Layout, parse_spec
from sftjob_api.layout import status_artifacts
from sftjob_api.manifest import SERVING_MOUNT, verify_manifest
from sftjob_api.storage import LocalStore, S3Store

from .sftjob_cli import clean_env, sftjob_doc, sftjob_run, write_spec
from .test_train_only import run_train_pod

pytestmark = [pytest.mark.trainer, pytest.mark.slow]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_to_store(tmp_path: Path, name: str, spec: dict[str, Any]) -> LocalStore:
    write_spec(tmp_path / "job.yaml", sftjob_doc(name, spec))
    sftjob_run("job.yaml", tmp_path, env=clean_env(OMP_NUM_THREADS="1"))
    return LocalStore(str(tmp_path / "runs" / "local" / name))


def serving_and_adapter(store: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """serving.json and adapter_config.json, after checking the manifest lists serving.json and verifies."""
    assert verify_manifest(store) == []
    manifest = json.loads(store.get_bytes(Layout.MANIFEST))
    assert Layout.SERVING_MANIFEST in {f["path"] for f in manifest["files"]}
    return store.read_json(Layout.SERVING_MANIFEST), store.read_json(f"{Layout.ADAPTER}/adapter_config.json")


def base_spec(model: str, train: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": model},
        "dataset": {"train": [train], "format": "alpaca", "maxSeqLength": 96},
        "method": {
            "type": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": PROJECTIONS},
        },
        "training": {
            "maxSteps": 2,
            "globalBatchSize": 4,
            "microBatchSize": 2,
            "gradientCheckpointing": False,
        },
        "resources": {"nodes": 1, "gpusPerNode": 0, "deepspeed": {"zeroStage": 0}},
        "output": {"uri": "./runs", "serving": "vllm"},
        "merge": {"dtype": "float32"},
    }
    spec.update(over)
    return spec


@pytest.mark.timeout(900)
def test_dora_for_vllm_hands_off_the_merged_model(tiny_model_dir, tmp_path):
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(24, seed=1))
    spec = base_spec(tiny_model_dir, "./train.jsonl", eval={"enabled": False})
    spec["method"]["lora"]["useDora"] = True
    store = run_to_store(tmp_path, "tiny-dora", spec)
    serving, adapter = serving_and_adapter(store)

    assert adapter["use_dora"] is True and adapter["base_model_name_or_path"] == tiny_model_dir
    assert serving["artifact"] == "merged"
    assert serving["message"].startswith("the merged model is handed off: spec.method.lora.useDora: vLLM")
    assert serving["uri"] == str(tmp_path / "runs" / "local" / "tiny-dora") + "/merged/"
    assert store.exists(f"{Layout.MERGED}/model.safetensors")
    # the documented rule, applied to what peft wrote, finds what vLLM would refuse
    assert [p.split(":")[0] for p in serving["adapterChecks"]] == ["use_dora"]
    assert serving["vllm"]["args"][:3] == ["vllm", "serve", f"{SERVING_MOUNT}/merged"]
    assert "--enable-lora" not in serving["vllm"]["args"] and serving["eval"] is None


def test_train_only_pod_writes_the_serving_manifest_to_s3(s3, tiny_model_dir, tmp_path):
    from trainer.tiny import dataset_rows, write_jsonl

    data = write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(24, seed=1))
    output = {
        "uri": s3.uri("runs"),
        "endpoint": s3.endpoint_url,
        "pathStyle": True,
        "credentialsSecret": {"name": "s3"},
        "serving": "tgi",
    }
    spec = parse_spec(
        base_spec(tiny_model_dir, data, output=output, eval={"enabled": False}, merge={"enabled": False})
    )
    env = run_train_pod(spec, s3, tmp_path)

    arts = status_artifacts(spec, "team-a", "tiny")  # what status.artifacts advertises
    assert arts.serving is not None and arts.serving.artifact == "adapter"
    store = S3Store(str(arts.root), s3.client())
    serving, adapter = serving_and_adapter(store)
    assert adapter["base_model_name_or_path"] == tiny_model_dir  # the spec's path, not the pod's work dir
    assert not adapter["base_model_name_or_path"].startswith(env["SFTJOB_WORK_DIR"])
    assert serving["uri"] == arts.serving.uri == arts.adapter
    assert arts.serving.manifest == f"{arts.root}{Layout.SERVING_MANIFEST}"
    assert serving["tgi"]["env"]["LORA_ADAPTERS"] == f"tiny={SERVING_MOUNT}/adapter"
    assert serving["tgi"]["env"]["MODEL_ID"] == tiny_model_dir
    assert serving["eval"] is None and serving["merged"] is None and serving["adapterChecks"] == []
