"""Workers of the GPU check that need torch, each run in its own time-boxed process by gpu_check.py.

python benchmarks/gpu_check_setup.py assets OUT_DIR [--smoke] [--tokenizer DIR]
    a randomly initialised Llama (1B-shaped, or tiny with --smoke) + tokenizer, the data set, the
    machine's measured bf16 matmul rate and the software versions -> OUT_DIR/assets.json
python benchmarks/gpu_check_setup.py export-tokenizer DEST      (here, with network: SmolLM2's tokenizer)
python benchmarks/gpu_check_setup.py repack-bnb WHEEL DEST_DIR   (here: keep only the CUDA 13 libraries)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_lib import WORDS, llama_matmul_params, make_rows, messages_jsonl

# Llama-3.2-1B's attention shape (hidden 2048, 16 layers, 32 heads, 8 KV heads) with TinyLlama's MLP width
BIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "trl",
    "datasets",
    "pydantic",
    "safetensors",
    "tokenizers",
)


def tiny_bpe(out_dir: str):
    """A byte-level BPE (vocab 512) trained offline on the benchmark's words, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([" ".join(WORDS) + " repeat reverse context user assistant: ."] * 50, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return tok


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


def gpu_name() -> str:
    try:
        q = "name,driver_version,memory.total"
        return (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            or "no GPU"
        )
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU (nvidia-smi absent)"


def matmul_peak_flops(n: int, iters: int) -> float:
    """Dense bf16 (GPU) or fp32 (CPU) n x n x n matmul rate: mean of `iters` products after 3 warm-ups."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def build_assets(out: str, smoke: bool, tokenizer_dir: str | None) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    on_gpu = torch.cuda.is_available()
    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)
    if tokenizer_dir and os.path.isdir(tokenizer_dir) and not smoke:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.save_pretrained(model_dir)
        tok_name = f"SmolLM2 BPE (vocab {len(tok)})"
    else:
        tok = tiny_bpe(model_dir)
        tok_name = f"tiny byte-level BPE (vocab {len(tok)})"
    shape = TINY if smoke else BIG
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    rows = make_rows(240 if smoke else 1600, max_answer=60 if smoke else 250)
    with open(os.path.join(out, "data.jsonl"), "w") as f:
        f.write(messages_jsonl(rows))
    with open(os.path.join(out, "rows.json"), "w") as f:
        json.dump(rows, f)
    cfg_d = cfg.to_dict()
    peak = matmul_peak_flops(8192 if on_gpu else 1024, 20 if on_gpu else 5)
    return {
        "model_dir": model_dir,
        "data": os.path.join(out, "data.jsonl"),
        "rows": os.path.join(out, "rows.json"),
        "n_rows": len(rows),
        "params": n_params,
        "matmul_params": llama_matmul_params(cfg_d),
        "config": {
            k: cfg_d[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },
        "description": (
            (
                f"randomly initialised Llama, {n_params / 1e9:.3f} B params "
                if n_params > 1e8
                else f"randomly initialised Llama, {n_params / 1e3:.0f} k params "
            )
            + f"(hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV, MLP "
            f"{shape['intermediate_size']}), {tok_name}, saved in {str(dtype).replace('torch.', '')}"
        ),
        "peak_flops": peak,
        "peak_kind": "bf16 8192^3" if on_gpu else "fp32 1024^3 (CPU)",
        "gpu": gpu_name(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "seconds": round(time.monotonic() - t0, 1),
    }


def export_tokenizer(dest: str) -> None:
    from transformers import AutoTokenizer

    from sftjob_trainer.model_cache import resolve

    AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct")).save_pretrained(dest)
    print(f"tokenizer saved to {dest}: {sorted(os.listdir(dest))}")


def repack_bnb(wheel: str, dest_dir: str, keep: tuple[str, ...] = ("cuda130", "cuda132", "cpu")) -> str:
    """Copy of a bitsandbytes wheel without the native libraries for other CUDA/ROCm versions (129 MB
    unpacked -> ~10 MB): the device carries at most 64 MiB. RECORD loses the dropped files' lines."""
    out = os.path.join(dest_dir, os.path.basename(wheel))
    tmp = out + ".tmp"

    def wanted(name: str) -> bool:
        base = os.path.basename(name)
        if not base.startswith("libbitsandbytes_"):
            return True
        return any(base == f"libbitsandbytes_{k}.so" for k in keep)

    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not wanted(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if wanted(x.split(",")[0])) + "\n").encode()
            dst.writestr(info, data)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assets")
    a.add_argument("out")
    a.add_argument("--smoke", action="store_true")
    a.add_argument("--tokenizer")
    e = sub.add_parser("export-tokenizer")
    e.add_argument("dest")
    r = sub.add_parser("repack-bnb")
    r.add_argument("wheel")
    r.add_argument("dest_dir")
    args = ap.parse_args()
    if args.cmd == "assets":
        res = build_assets(args.out, args.smoke, args.tokenizer)
        with open(os.path.join(args.out, "assets.json"), "w") as f:
            json.dump(res, f, indent=1)
        print("ASSETS " + json.dumps(res), flush=True)
    elif args.cmd == "export-tokenizer":
        export_tokenizer(args.dest)
    else:
        print(repack_bnb(args.wheel, args.dest_dir))


if __name__ == "__main__":
    main()
