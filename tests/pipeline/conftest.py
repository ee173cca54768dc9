"""Fixtures for the eval/merge/artifacts/`sftjob run` tests: the tiny Llama (`tiny_model_dir`, tests/conftest.py)
plus a LoRA adapter with non-zero B matrices, so base and adapted models really differ."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from testbed.mlflow_server import MlflowServer

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_adapter(model_dir: str, out_dir: str, seed: int = 1, std: float = 0.05) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=std)
    pm.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, testbed_logs: Path) -> Iterator[MlflowServer]:
    """A real MLflow tracking server on loopback (testbed.mlflow_server)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), testbed_logs).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_adapter(tiny_model_dir, str(tmp_path_factory.mktemp("tiny-adapter")))


def stage_config(
    model_dir: str,
    output_root: str,
    work_dir: str,
    train: str,
    eval_file: str | None = None,
    **sections: object,
) -> dict:
    """A trainer config for the eval/merge stages (same shape as the operator renders)."""
    cfg: dict = {
        "run": {"namespace": "test", "name": "tiny", "outputRoot": output_root},
        "model": {"uri": model_dir},
        "dataset": {
            "train": [train],
            "format": "alpaca",
            "maxSeqLength": 128,
            **({"eval": [eval_file]} if eval_file else {}),
        },
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {"maxSteps": 4, "globalBatchSize": 4, "microBatchSize": 2},
        "output": {"uri": output_root},
        "eval": {"maxSamples": 16, "maxNewTokens": 8},
        "merge": {"dtype": "float32"},
        "runtime": {"metricsPort": 0, "workDir": work_dir},
    }
    cfg.update(sections)
    return cfg


def write_json(path: str, obj: object) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path
