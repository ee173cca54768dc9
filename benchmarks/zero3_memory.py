"""Peak host memory (VmHWM) per rank while the trainer builds the model and DeepSpeed wraps it, with and
without ZeRO-3 init (not a test).

A randomly initialised Llama is saved once as safetensors; then, for each configuration, every rank of a
`torchrun` (gloo, CPU) loads it with the trainer's own functions (`model.zero3_init`, `load_base`,
`apply_method`, `make_optimizer`, `deepspeed_config`, DeepSpeed's initialize) and runs one tiny step.
Configurations: 1 rank (the trainer runs ZeRO stage 0 there: `speed.effective_zero_stage`), 2 ranks at
ZeRO-3 built as before (every rank materialises the whole model), 2 ranks built under ZeRO-3 init.

    python benchmarks/zero3_memory.py [--hidden 2048 --layers 16 --intermediate 5632 --vocab 32000]
        [--method lora|full] [--configs 1:off,2:off,2:on]

Peak RSS does not depend on other load on the machine; wall times do, and are printed only as a guide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

SEQ = 64  # tokens in the one training step: enough to run forward/backward, too few to matter for memory


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def build(a: argparse.Namespace, out: str) -> int:
    """Save a random Llama of the requested shape (fp32 safetensors); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 128,
        num_key_value_heads=a.hidden // 128,
        vocab_size=a.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def trainer_config(model_dir: str, method: str, work: str) -> Any:
    from sftjob_trainer.config import parse_config

    return parse_config(
        {
            "run": {"namespace": "bench", "name": "zero3-memory", "outputRoot": os.path.join(work, "out")},
            "model": {"uri": model_dir},
            "dataset": {"train": [os.path.join(work, "unused.jsonl")], "format": "alpaca"},
            "method": {"type": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "training": {"maxSteps": 1, "globalBatchSize": 8, "microBatchSize": 1},
            "output": {"uri": os.path.join(work, "out")},
            "runtime": {"metricsPort": 0, "workDir": work},
        }
    )


def worker(a: argparse.Namespace) -> None:
    """One rank: build as the trainer does, wrap with DeepSpeed, one step; write VmHWM at each point."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from sftjob_trainer.config import DistEnv
    from sftjob_trainer.loss import SelectiveLossLM
    from sftjob_trainer.model import apply_method, load_base, zero3_init
    from sftjob_trainer.schedule import deepspeed_config
    from sftjob_trainer.speed import effective_zero_stage
    from sftjob_trainer.train import init_distributed, make_optimizer, numel, seed_all

    env = DistEnv.from_env()
    init_distributed(env, on_gpu=False, collective_timeout_s=1800)
    import deepspeed

    cfg = trainer_config(a.model, a.method, a.work)
    seed_all(7)
    stage = effective_zero_stage(3, env.world_size, "none", "none")
    ds_cfg = deepspeed_config(
        micro=1,
        accum=1,
        world=env.world_size,
        stage=stage,
        offload_optimizer="none",
        offload_params="none",
        bf16=False,
        fp16=False,
        grad_clip=1.0,
    )
    rec: dict[str, Any] = {"rank": env.rank, "world": env.world_size, "stage": stage}
    # the imports (torch, transformers, deepspeed) and the process group
    rec["rss_before_kib"] = vm_kib("VmRSS")
    t0 = time.monotonic()
    keep = zero3_init(ds_cfg, cfg.method) if a.zero_init == "on" else None  # alive until initialize
    rec["zero3_init"] = keep is not None
    model = apply_method(load_base(a.model, cfg.method, torch.float32), cfg.method, cfg.training)
    rec["params"] = sum(numel(p) for p in model.parameters())
    rec["params_held"] = sum(p.numel() for p in model.parameters())
    rec["hwm_built_kib"] = vm_kib("VmHWM")
    wrapper = SelectiveLossLM(model)
    wrapper.train()
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper, optimizer=make_optimizer(wrapper, cfg), config=ds_cfg
    )
    rec["hwm_initialized_kib"] = vm_kib("VmHWM")
    g = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, a.vocab, (1, SEQ), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    out, _ = engine(ids, pos, targets)
    engine.backward(out)
    engine.step()
    rec["hwm_step_kib"] = vm_kib("VmHWM")
    # now, not peak: private memory vs pages of mapped files (the weights file when transformers maps it lazily,
    # shared between ranks on one machine through the page cache)
    rec["anon_end_kib"] = vm_kib("RssAnon")
    rec["file_end_kib"] = vm_kib("RssFile")
    rec["seconds"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(a.results, f"rank{env.rank}.json"), "w") as f:
        json.dump(rec, f)
    del keep


def run_config(a: argparse.Namespace, model_dir: str, world: int, zero_init: str, tmp: str) -> list[dict]:
    from sftjob_api.ports import free_port

    results = tempfile.mkdtemp(dir=tmp, prefix=f"w{world}-{zero_init}-")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        os.path.abspath(__file__),
        "--worker",
        f"--model={model_dir}",
        f"--method={a.method}",
        f"--vocab={a.vocab}",
        f"--zero-init={zero_init}",
        f"--results={results}",
        f"--work={results}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-6000:])
        raise SystemExit(f"world {world}, zero-init {zero_init}: exit code {res.returncode}")
    recs = []
    for r in range(world):
        with open(os.path.join(results, f"rank{r}.json")) as f:
            recs.append(json.load(f))
    return recs


def gib(kib: int) -> str:
    return f"{kib / (1 << 20):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--configs", default="1:off,2:off,2:on", help="world:zero-init pairs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build-to", dest="build_to", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--zero-init", dest="zero_init", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    if a.build_to:
        print(build(a, a.build_to))
        return
    with tempfile.TemporaryDirectory(prefix="zero3-memory-") as tmp:
        model_dir = os.path.join(tmp, "model")
        # in its own process, so that the model built here is not in memory while the ranks run
        shape = [f"--{k}={getattr(a, k)}" for k in ("hidden", "intermediate", "layers", "vocab")]
        built = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *shape, f"--build-to={model_dir}"],
            check=True,
            capture_output=True,
            text=True,
        )
        n = int(built.stdout.split()[-1])
        size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
        print(
            f"random Llama: hidden {a.hidden}, {a.layers} layers, intermediate {a.intermediate}, vocab {a.vocab}:"
            f" {n / 1e9:.3f}B params, {size / (1 << 30):.2f} GiB fp32 safetensors; method {a.method}"
        )
        print(
            "GiB per rank: RSS before loading; peak RSS (VmHWM) after build (load_base + apply_method), after"
            " deepspeed.initialize, after one step; RssAnon / RssFile at the end. params held: fraction of the"
            " parameters this rank holds after the build"
        )
        head = (
            "world",
            "zero3 init",
            "stage",
            "rank",
            "params held",
            "before",
            "built",
            "initialized",
            "step",
            "anon / file now",
            "s (load + init + step)",
        )
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for item in a.configs.split(","):
            world, zi = item.split(":")
            for r in run_config(a, model_dir, int(world), zi, tmp):
                row = (
                    r["world"],
                    "on" if r["zero3_init"] else "off",
                    r["stage"],
                    r["rank"],
                    f"{r['params_held'] / r['params']:.3f}",
                    gib(r["rss_before_kib"]),
                    gib(r["hwm_built_kib"]),
                    gib(r["hwm_initialized_kib"]),
                    gib(r["hwm_step_kib"]),
                    f"{gib(r['anon_end_kib'])} / {gib(r['file_end_kib'])}",
                    r["seconds"],
                )
                print("| " + " | ".join(str(x) for x in row) + " |", flush=True)


if __name__ == "__main__":
    main()
