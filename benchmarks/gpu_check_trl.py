"""TRL SFTTrainer on the GPU check's model and data (the anchor for our trainer's tokens/s); one run per process.

    python benchmarks/gpu_check_trl.py --model DIR --rows rows.json --method lora|qlora [--steps 10 --warmup 2
        --batch 32 --accum 2 --max-len 2048 --lr 2e-4] [--config default|fastest]

Same LoRA as ours (r16, alpha 32, no dropout, all linear layers), completion-only loss (TRL's default for
prompt/completion data), no gradient checkpointing, bf16 on GPU (fp32 on CPU). Two configurations:
- default: SFTConfig's defaults (padded batches);
- fastest: `packing=True, packing_strategy="bfd", padding_free=True` (samples packed best-fit-decreasing
  into rows of --max-len, position ids restarting per sample, no padding), Liger kernels
  (`use_liger_kernel`) when liger-kernel is installed and a GPU is there, and the attention implementation
  our trainer uses on this device (`model.training_attention`: FlexAttention on CUDA, SDPA on CPU).
Real tokens are counted where they enter the model (attention-mask sum, or every token when padding-free
sends none); the clock reads at the end of each optimizer step after a CUDA synchronize. Prints `RESULT {...}`
with the per-step losses (same data and lr as ours: comparable first steps) and the peak memory (torch's
allocator on GPU; VmHWM, the process's peak RSS, on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import tempfile
import time


def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", required=True)
    ap.add_argument("--method", choices=("lora", "qlora"), required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--config", choices=("default", "fastest"), default="default")
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kw: dict = {"dtype": dtype}
    fastest = a.config == "fastest"
    liger = fastest and on_gpu and importlib.util.find_spec("liger_kernel") is not None
    if fastest:
        from sftjob_trainer.model import training_attention  # the benchmark's PYTHONPATH has the trainer

        kw["attn_implementation"] = training_attention(on_gpu)
    if a.method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    if on_gpu:
        kw["device_map"] = {"": 0}
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
    with open(a.rows) as f:
        rows = json.load(f)
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

    def count(_m, args, kwargs):
        am = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        counted["tokens"] += int(am.sum()) if am is not None else int(ids.numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), counted["tokens"]))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(
            output_dir=os.path.join(tmp, "trl"),
            per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=a.accum,
            max_steps=a.warmup + a.steps,
            learning_rate=a.lr,
            max_length=a.max_len,
            gradient_checkpointing=False,
            bf16=on_gpu,
            fp16=False,
            use_cpu=not on_gpu,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            lr_scheduler_type="constant",
            dataloader_num_workers=0,
            seed=42,
            # TRL 1.16 enforces max_length under padding_free only when packing: best-fit-decreasing packing
            # into rows of max_length (as ours), padding-free inside a row
            packing=fastest,
            packing_strategy="bfd",
            padding_free=fastest,
            use_liger_kernel=liger,
        )
        peft_cfg = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        trainer = SFTTrainer(
            model=model,
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_cfg,
            callbacks=[Clock()],
        )
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    (t0, k0), (t1, k1) = marks[a.warmup - 1], marks[-1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = marks[a.warmup - 1 :]
    per_step = [(kb - ka) / (tb - ta) for (ta, ka), (tb, kb) in itertools.pairwise(timed) if tb > ta]
    res = {
        "tokens": k1 - k0,
        "seconds": round(t1 - t0, 3),
        "timed_steps": len(marks) - a.warmup,
        "tokens_per_second": round((k1 - k0) / (t1 - t0), 1),
        "losses": losses,
        "median_step_tokens_per_second": round(statistics.median(per_step), 1) if per_step else None,
        "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "samples_per_step": None if fastest else a.batch * a.accum,  # packed: rows, each of several samples
        "rows_per_step": a.batch * a.accum,
        "trl_config": a.config,
        "packing": "bfd" if fastest else None,
        "padding_free": fastest,
        "liger": liger,
        "attention": model.config._attn_implementation,
    }
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
