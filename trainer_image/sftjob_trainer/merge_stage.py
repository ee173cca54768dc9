"""The merge stage: `python -m sftjob_trainer merge --config PATH`.

Folds the trained LoRA adapter (the aligned one with spec.alignment: Layout.final_weights) into the
*full-precision* base model (also for qlora: the adapter is merged into the original float weights, never
into the 4-bit ones) with peft's `merge_and_unload`, casts to
spec.merge.dtype and writes safetensors + tokenizer + generation config to merged/ (or spec.merge.uri).

Verification (results in merged/verification.json; the stage fails if either check fails):
1. exactness of the merge, in float32: logits of the merged model vs base + adapter on a few inputs,
   max |difference| <= FP32_ATOL (1e-3; measured ~1e-5 on SmolLM2-135M);
2. the saved files: the model is re-loaded from disk in the requested dtype and its logits compared with
   the float32 base + adapter: relative error ||d||_2 / ||ref||_2 <= LOWP_RTOL[dtype] and greedy next-token
   agreement >= MIN_TOP1_AGREEMENT. float32: relative error <= 1e-5.
For qlora the reference is the full-precision base + adapter, so the 4-bit quantization error the adapter
was trained against is not part of the check (that is the point of merging into full precision).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sftjob_api import Layout, Stage, stages
from sftjob_api.exit_codes import ExitCode, PermanentError
from sftjob_api.manifest import close_run
from sftjob_api.storage import open_store
from sftjob_api.trainer_config import TrainerConfig

from .metrics import log_json
from .model import config_tokenizer, model_dir, torch_dtype
from .tracking import Tracker, termination_message

FP32_ATOL = 1e-3
LOWP_RTOL = {"float32": 1e-5, "bfloat16": 0.05, "float16": 0.01}
MIN_TOP1_AGREEMENT = 0.9
VERIFY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Extract the details as JSON: Anna Berg is 41 and lives in Oslo.",
    "def fibonacci(n):\n    return n if n < 2 else",
    "Question: what is the capital of France? Answer:",
)


def verify_inputs(tok: Any) -> Any:
    rows = [tok(t, add_special_tokens=True)["input_ids"] for t in VERIFY_TEXTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows], dtype=torch.long)


def logits(model: Any, ids: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def compare(ref: Any, got: Any) -> dict[str, float]:
    d = (got - ref).float()
    return {
        "max_abs_diff": float(d.abs().max()),
        "rel_l2": float(d.norm() / ref.norm().clamp_min(1e-12)),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def merge_adapter(
    model_dir: str, adapter_dir: str, tok: Any, dtype_name: str, out_dir: str, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Merge, save and verify; returns the verification record (raises PermanentError if it fails)."""
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = verify_inputs(tok)
    ref = logits(model, ids)
    merged = model.merge_and_unload().eval()
    exact = compare(ref, logits(merged, ids))
    dtype = torch_dtype(dtype_name)
    merged = merged.to(dtype)
    merged.config.use_cache = True  # training turns it off; users generate with the merged model
    shutil.rmtree(out_dir, ignore_errors=True)
    merged.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(out_dir)
    del merged, model, base
    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=dtype, trust_remote_code=trust_remote_code
    ).eval()
    saved = compare(ref, logits(reloaded, ids))
    rtol = LOWP_RTOL[dtype_name]
    rec = {
        "dtype": dtype_name,
        "inputs": list(VERIFY_TEXTS),
        "tokens_per_input": int(ids.shape[1]),
        "merge_fp32": exact,
        "saved": saved,
        "tolerance": {
            "fp32_max_abs_diff": FP32_ATOL,
            "saved_rel_l2": rtol,
            "saved_top1_agreement": MIN_TOP1_AGREEMENT,
        },
        "max_abs_diff": exact["max_abs_diff"],
        "passed": exact["max_abs_diff"] <= FP32_ATOL
        and saved["rel_l2"] <= rtol
        and saved["top1_agreement"] >= MIN_TOP1_AGREEMENT,
    }
    with open(os.path.join(out_dir, "verification.json"), "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def main(cfg: TrainerConfig) -> int:
    t0 = time.monotonic()
    if Stage.MERGE not in stages(cfg):
        log_json(
            "merge_skipped",
            reason=f"nothing to merge: method {cfg.method.type}, merge.enabled {cfg.merge.enabled}",
        )
        return int(ExitCode.OK)
    store = open_store(cfg.run.output_root, cfg.output)
    tracker = Tracker(cfg, store, Stage.MERGE)
    work = os.path.join(cfg.runtime.work_dir, "merge")
    shutil.rmtree(work, ignore_errors=True)
    base_dir = model_dir(cfg)
    tok = config_tokenizer(cfg, base_dir)
    weights = Layout.final_weights(cfg)  # aligned/ when the spec aligns
    adapter_dir = os.path.join(work, weights)
    if not store.download_dir(weights, adapter_dir):
        raise PermanentError(f"no adapter under {weights}/: did training (and alignment) finish?")
    out_dir = os.path.join(work, Layout.MERGED)
    log_json("merge_start", dtype=cfg.merge.dtype)
    rec = merge_adapter(base_dir, adapter_dir, tok, cfg.merge.dtype, out_dir, cfg.model.trust_remote_code)
    log_json("merge_verified", **{k: rec[k] for k in ("merge_fp32", "saved", "passed")})
    if not rec["passed"]:
        raise PermanentError(
            f"merged model does not match base + adapter: {rec['merge_fp32']}, "
            f"saved {rec['saved']} (tolerance {rec['tolerance']})"
        )
    if cfg.merge.uri:  # elsewhere; the manifest lists the run root: keep the verification next to it too
        target = open_store(cfg.merge.uri, cfg.output)
        for name in sorted(os.listdir(out_dir)):
            target.put_file(os.path.join(out_dir, name), name)
        store.put_bytes(json.dumps(rec, indent=1).encode(), Layout.MERGE_VERIFICATION)
    else:
        store.upload_dir(out_dir, Layout.MERGED)
    shutil.rmtree(work, ignore_errors=True)
    tracker.metrics({f"merge_{k}": rec["saved"][k] for k in ("rel_l2", "top1_agreement")})
    tracker.metrics({"merge_max_abs_diff": rec["max_abs_diff"]})
    tracker.artifact(Layout.MERGE_VERIFICATION)
    if cfg.is_final(Stage.MERGE):
        tracker.flush()  # the run's id is in the store before the manifest lists it
        close_run(store, cfg, Stage.MERGE)
        tracker.artifact(Layout.MANIFEST)
    termination_message(cfg, tracker.close(final=cfg.is_final(Stage.MERGE)))
    log_json("merge_done", seconds=round(time.monotonic() - t0, 1))
    return int(ExitCode.OK)
