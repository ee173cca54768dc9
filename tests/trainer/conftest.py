"""Fixtures for trainer tests: the tokenizer of the tiny Llama (`tiny_model_dir`, tests/conftest.py), and one
gloo rank inside the test's own process."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def one_rank_in_process(monkeypatch):
    """torch.distributed as a world of one gloo rank in this pytest process (the trainer's setup or
    deepspeed.init_distributed creates the group), torn down after the test with DeepSpeed's cached clone of
    the world group: DeepSpeed keeps it in a module global, so the next in-process test in this worker would
    otherwise broadcast over a group of the destroyed world ("Group ... is not registered")."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from sftjob_api.ports import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    for k, v in {**env, "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    groups._WORLD_GROUP = None
