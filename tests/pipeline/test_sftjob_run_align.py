"""`sftjob run` of a spec with spec.alignment: train -> align -> eval (with held-out preference metrics and
their gates) -> merge of the aligned adapter, on this machine, the tiny Llama, one rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .sftjob_cli import clean_env, sftjob_doc, sftjob_run, write_spec

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def spec(model_dir: str) -> dict:
    return {
        "model": {"uri": model_dir},
        "dataset": {
            "train": ["./train.jsonl"],
            "eval": ["./eval.jsonl"],
            "format": "alpaca",
            "maxSeqLength": 96,
        },
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {
            "maxSteps": 3,
            "learningRate": 3e-3,
            "globalBatchSize": 4,
            "microBatchSize": 2,
            "gradientCheckpointing": False,
        },
        "alignment": {
            "beta": 0.5,
            "dataset": {"train": ["./pairs.jsonl"], "eval": ["./held.jsonl"]},
            "training": {"maxSteps": 4, "learningRate": 5e-3, "globalBatchSize": 4, "microBatchSize": 2},
        },
        "resources": {"nodes": 1, "gpusPerNode": 0, "deepspeed": {"zeroStage": 0}},
        "output": {"uri": "./runs"},
        "eval": {
            "maxSamples": 4,
            "maxNewTokens": 4,
            "gates": {"minPreferenceAccuracy": 0.0, "minRewardMargin": -1000},
        },
        "merge": {"dtype": "float32"},
    }


def test_sftjob_run_trains_aligns_evaluates_and_merges_the_aligned_adapter(tiny_model_dir, tmp_path: Path):
    import torch
    from safetensors.torch import load_file
    from trainer.tiny import dataset_rows, preference_rows, write_jsonl

    from sftjob_api.manifest import verify_manifest
    from sftjob_api.storage import LocalStore

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(40, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(4, seed=2))
    write_jsonl(str(tmp_path / "pairs.jsonl"), preference_rows(16, seed=3))
    write_jsonl(str(tmp_path / "held.jsonl"), preference_rows(6, seed=4))
    path = write_spec(tmp_path / "align.yaml", sftjob_doc("tiny-align", spec(tiny_model_dir)))
    proc = sftjob_run(path, tmp_path, env=clean_env(OMP_NUM_THREADS="1"))
    phases = [
        line.split("phase ")[1].split(":")[0] for line in proc.stdout.splitlines() if "] phase " in line
    ]
    assert phases == ["Pending", "Training", "Aligning", "Evaluating", "Merging", "Succeeded"], proc.stdout

    root = tmp_path / "runs" / "local" / "tiny-align"
    store = LocalStore(str(root))
    assert verify_manifest(store) == []
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stages"]["align"] == "done" and manifest["metrics"]["align"]["steps"] == 4
    results = json.loads((root / "eval" / "results.json").read_text())
    trained = results["trained"]
    assert trained["preference_pairs"] == len(
        json.loads((root / "align" / "reference_logps.json").read_text())["eval"]
    )
    assert 0 <= results["status"]["preferenceAccuracy"] <= 1 and results["gates_passed"]
    assert results["status"]["rewardMargin"] == pytest.approx(trained["reward_margin"])
    serving = json.loads((root / "serving" / "serving.json").read_text())
    assert serving["adapter"]["uri"].endswith("/aligned/")

    # the merged model folds the aligned adapter (not the SFT one): W + (alpha / r) B A for one layer
    merged = load_file(str(root / "merged" / "model.safetensors"))
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"

    def folded(adapter_dir: Path):
        a = load_file(str(adapter_dir / "adapter_model.safetensors"))
        lora = "base_model.model." + key.removesuffix(".weight")
        return base[key] + 2.0 * a[f"{lora}.lora_B.weight"] @ a[f"{lora}.lora_A.weight"]

    assert torch.allclose(merged[key], folded(root / "aligned"), atol=1e-5)
    assert not torch.allclose(merged[key], folded(root / "adapter"), atol=1e-5)
