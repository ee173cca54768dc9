"""Real tokens/s and peak RSS of DPO steps: our align stage vs TRL's DPOTrainer, side by side (not a test).

Same pairs (examples/data/preferences-train.jsonl) and settings as the SFT + DPO example
(examples/sftjob-sft-dpo.yaml, read from it: LoRA, beta, sftLossWeight, learning rate, pairs per step,
micro-batch, token limit), same model (SmolLM2-135M-Instruct from the model cache, float32 on CPU). Both
start from a fresh adapter on the base model (ours: an untrained adapter written where training's would be;
TRL: its peft_config), so the reference is the base model on both sides. With sftLossWeight TRL runs
loss_type [sigmoid, sft] (its NLL is averaged over the batch's chosen tokens, ours per pair: same work). Each mode runs in its own process; the first step is
warm-up and not timed. Real tokens = the non-padding tokens of the forward passes that carry gradients
(prompt twice + chosen + rejected per pair), on both sides.

Modes:
    ours          the align stage as examples/sftjob-sft-dpo.yaml runs it: micro-batch of pairs x 2 rows,
                  no gradient checkpointing; reference log-probabilities computed once before step 1
    ours_gc       the same with gradient checkpointing (our default policy, selective)
    trl_default   DPOConfig defaults (gradient checkpointing on, the reference forward every step through the
                  adapter-disabled model), the example's pairs per step in one batch
    trl_fast      TRL's documented speed settings that apply on CPU: gradient_checkpointing=False,
                  precompute_ref_log_probs=True (padding_free is documented as falling back to padding in
                  TRL 1.x, use_liger_kernel needs Triton on a GPU)
All modes compute in fp32: DPOConfig's bf16 default means CPU autocast to bf16, which on CPUs without
AVX512-BF16 runs PyTorch's scalar fallback GEMM (~10x slower; benchmarks/trainer_throughput.py).

    python benchmarks/dpo_vs_trl.py [--steps 4] [--repeats 1] [--modes ours,trl_default,...]

Needs trl (`trainer_image/install.sh --with-bench`) and the model cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from trainer_throughput import MODEL, median, token_clock, vm_hwm  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "sftjob-sft-dpo.yaml"
PAIRS = HERE.parent / "examples" / "data" / "preferences-train.jsonl"
MODES = ("ours", "ours_gc", "trl_default", "trl_fast")


def example_settings() -> dict:
    """The example's alignment settings (one home: the benchmark runs what the example runs)."""
    import yaml

    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    al, t, lora = spec["alignment"], spec["alignment"]["training"], spec["method"]["lora"]
    return {
        "max_len": al["dataset"]["maxSeqLength"],
        "batch": t["globalBatchSize"],
        "micro": t["microBatchSize"],
        "lr": t["learningRate"],
        "beta": al["beta"],
        "sft_weight": al.get("sftLossWeight", 0.0),
        "r": lora["r"],
        "alpha": lora["alpha"],
        "targets": lora["targetModules"],
    }


S = example_settings()
MAX_LEN, BATCH, MICRO, LR, BETA, R = S["max_len"], S["batch"], S["micro"], S["lr"], S["beta"], S["r"]
TARGETS = S["targets"]


def fresh_adapter(out_root: str) -> None:
    """An untrained LoRA adapter (B = 0: the policy equals the base model) where training writes its own,
    so the align stage starts from the base model as TRL does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftjob_api import Layout
    from sftjob_trainer.model_cache import resolve

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve(MODEL), dtype=torch.float32)
    lora = LoraConfig(
        r=R, lora_alpha=S["alpha"], lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    get_peft_model(base, lora).save_pretrained(os.path.join(out_root, Layout.ADAPTER))


def run_ours(steps: int, gc: bool, tmp: str) -> dict:
    import io
    from contextlib import redirect_stdout

    from sftjob_trainer import align_stage
    from sftjob_trainer.config import parse_config

    out = os.path.join(tmp, "out")
    cfg = parse_config(
        {
            "run": {"namespace": "bench", "name": "ours", "outputRoot": out},
            "model": {"uri": MODEL},
            "dataset": {"train": [str(PAIRS)], "format": "alpaca", "maxSeqLength": 256},  # unused by align
            "method": {
                "type": "lora",
                "lora": {"r": R, "alpha": S["alpha"], "dropout": 0.0, "targetModules": TARGETS},
            },
            "training": {"maxSteps": steps, "learningRate": LR * 10, "gradientCheckpointing": gc},
            "alignment": {
                "beta": BETA,
                "sftLossWeight": S["sft_weight"],
                "dataset": {"train": [str(PAIRS)], "maxSeqLength": MAX_LEN},
                "training": {
                    "maxSteps": steps,
                    "learningRate": LR,
                    "globalBatchSize": BATCH,
                    "microBatchSize": MICRO,
                    "checkpointSteps": 10_000,
                    "warmupRatio": 0.0,
                },
            },
            "output": {"uri": out},
            "eval": {"enabled": False},
            "merge": {"enabled": False},
            "runtime": {"metricsPort": 0, "workDir": os.path.join(tmp, "work")},
        }
    )
    fresh_adapter(cfg.run.output_root)
    buf = io.StringIO()
    with redirect_stdout(buf):
        align_stage.main(cfg)
    ev = [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]
    st = [e for e in ev if e["event"] == "step"][1:]
    return {"tokens": sum(e["tokens"] for e in st), "seconds": sum(e["step_seconds"] for e in st)}


def run_trl(steps: int, tmp: str, mode: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from sftjob_trainer.model_cache import resolve

    path = resolve(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(x) for x in PAIRS.read_text().splitlines()]
    ds = Dataset.from_list(  # conversational: the prompt rendered with the chat template, as ours
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    clock, span = token_clock(model, grad_only=True)  # not the reference forwards
    fast = mode == "trl_fast"
    cfg = DPOConfig(
        output_dir=os.path.join(tmp, "trl"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        beta=BETA,
        # sftLossWeight: TRL's sigmoid + sft combination (the same length-normalised NLL of the chosen answer)
        **(
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, S["sft_weight"]]}
            if S["sft_weight"]
            else {}
        ),
        max_length=MAX_LEN,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=42,
        bf16=False,  # see the module docstring
        fp16=False,
        **({"gradient_checkpointing": False, "precompute_ref_log_probs": True} if fast else {}),
    )
    lora = LoraConfig(
        r=R, lora_alpha=S["alpha"], lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[clock]
    )
    trainer.train()
    return span()


def worker(mode: str, steps: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        res = (
            run_ours(steps, mode == "ours_gc", tmp) if mode.startswith("ours") else run_trl(steps, tmp, mode)
        )
    res.update(mode=mode, peak_rss_bytes=vm_hwm(), tokens_per_second=res["tokens"] / res["seconds"])
    print("RESULT " + json.dumps(res), flush=True)


def spawn(mode: str, steps: int) -> dict | None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{mode}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return dict(json.loads(line[7:]))


def table(results: list[dict]) -> str:
    """Markdown: per mode the median tokens/s and peak RSS over the repeats, and ours against it."""
    ours = median([r["tokens_per_second"] for r in results if r["mode"] == "ours"] or [float("nan")])
    lines = [
        "| mode | real tokens/s (median) | min-max | peak RSS GB | ours / mode |",
        "|---|---|---|---|---|",
    ]
    for mode in dict.fromkeys(r["mode"] for r in results):
        tps = [r["tokens_per_second"] for r in results if r["mode"] == mode]
        rss = median([r["peak_rss_bytes"] / 1e9 for r in results if r["mode"] == mode])
        lines.append(
            f"| {mode} | {median(tps):.1f} | {min(tps):.1f}-{max(tps):.1f} | {rss:.2f} | {ours / median(tps):.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="also write every run's result here")
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps)
        return
    modes, results = a.modes.split(","), []
    for rep in range(a.repeats):
        for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:  # rotated: no fixed slot
            res = spawn(mode, a.steps)
            if res is not None:
                results.append({**res, "repeat": rep})
                print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print(
        f"\n{len(PAIRS.read_text().splitlines())} pairs ({PAIRS.name}); {a.steps} steps per run (first untimed),"
        f" {a.repeats} repeat(s); {BATCH} pairs per step, <= {MAX_LEN} tokens per sequence; LoRA r{R};"
        f" SmolLM2-135M fp32 on CPU ({os.cpu_count()} cores)\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
