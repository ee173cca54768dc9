"""Merge: the merged model's logits equal base + adapter (checked independently of the stage's own check)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .conftest import stage_config

pytestmark = pytest.mark.trainer


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_stage_output_matches_base_plus_adapter(tiny_model_dir, tiny_adapter_dir, tmp_path, dtype):
    import torch
    from peft import PeftModel
    from trainer.tiny import dataset_rows, write_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftjob_trainer import merge_stage
    from sftjob_trainer.config import parse_config

    out = tmp_path / "out"
    shutil.copytree(tiny_adapter_dir, out / "adapter")
    train = write_jsonl(str(tmp_path / "t.jsonl"), dataset_rows(20))
    cfg = stage_config(tiny_model_dir, str(out), str(tmp_path / "work"), train, merge={"dtype": dtype})
    assert merge_stage.main(parse_config(cfg)) == 0

    merged_dir = out / "merged"
    names = set(os.listdir(merged_dir))
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "verification.json",
    } <= names
    assert not any(n.startswith("adapter") for n in names)  # a plain model, no peft files

    # independent check on inputs the stage never saw
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (3, 24))
    ref = logits(
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir
        ).eval(),
        ids,
    )
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == getattr(torch, dtype)
    got = logits(merged.eval(), ids)
    assert (
        ref - base
    ).abs().max() > 1e-2  # the adapter changes the outputs, so the comparison means something
    if dtype == "float32":
        assert (got - ref).abs().max() < 1e-4
    else:
        assert float((got - ref).norm() / ref.norm()) < 0.05
    AutoTokenizer.from_pretrained(merged_dir)  # loads

    with open(merged_dir / "verification.json") as f:
        ver = json.load(f)
    assert ver["passed"] and ver["merge_fp32"]["max_abs_diff"] < 1e-3
    with open(out / "manifest.json") as f:
        man = json.load(f)
    assert "merged/model.safetensors" in {x["path"] for x in man["files"]}
    assert man["stages"]["merge"] == "done"


def test_merge_refuses_a_mismatch(tiny_model_dir, tiny_adapter_dir, tmp_path, monkeypatch):
    """The verification can fail: with an impossible tolerance the stage raises instead of uploading."""
    from trainer.tiny import dataset_rows, write_jsonl

    from sftjob_api.exit_codes import PermanentError
    from sftjob_trainer import merge_stage
    from sftjob_trainer.config import parse_config

    out = tmp_path / "out"
    shutil.copytree(tiny_adapter_dir, out / "adapter")
    train = write_jsonl(str(tmp_path / "t.jsonl"), dataset_rows(20))
    cfg = stage_config(tiny_model_dir, str(out), str(tmp_path / "work"), train, merge={"dtype": "bfloat16"})
    monkeypatch.setitem(merge_stage.LOWP_RTOL, "bfloat16", 1e-9)  # bf16 rounding exceeds this
    with pytest.raises(PermanentError, match="does not match"):
        merge_stage.main(parse_config(cfg))
    assert not (out / "merged").exists() and not (out / "manifest.json").exists()
