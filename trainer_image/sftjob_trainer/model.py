"""Loading the base model and tokenizer and applying the fine-tuning method (qlora / lora / full).

Shared by train, eval and merge. Sources: a local directory (PVC) or an `s3://` prefix mirrored into a
local cache (kept between restarts of the same pod, skipped when sizes match). A directory holding a
single `.gguf` file is loaded through transformers' GGUF reader (dequantized to full precision).

Under ZeRO-3 (`zero3_init`) the base is built inside `deepspeed.zero.Init`: each parameter is partitioned as
soon as it is created and rank 0 alone reads the weights file, so the other ranks never hold the whole model.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sftjob_api.exit_codes import PermanentError
from sftjob_api.spec import MethodSpec, ModelSpec, OutputSpec, QuantizationSpec, TrainingSpec
from sftjob_api.storage import S3Location, download_prefix, s3_client
from sftjob_api.trainer_config import TrainerConfig

from . import model_cache
from .speed import checkpointing_kwargs, use_fast_lora_dropout


def resolve_dir(uri: str, cache_dir: str, output: OutputSpec | None = None) -> str:
    """A local directory for `uri`: a model-cache name, a path, or an s3:// prefix (downloaded once, with the
    client settings of spec.output)."""
    if model_cache.is_bare_name(uri):
        return model_cache.resolve(uri)
    if not uri.startswith("s3://"):
        if not os.path.isdir(uri):
            raise PermanentError(f"model directory not found: {uri}")
        return uri
    loc = S3Location.parse(uri)
    dest = os.path.join(cache_dir, loc.bucket, loc.key.strip("/"))
    marker = os.path.join(dest, model_cache.MARKER)
    if not os.path.exists(marker):
        files = download_prefix(loc, dest, s3_client(output))
        if not files:
            raise PermanentError(f"no model files under {uri}")
        with open(marker, "w") as f:
            f.write("\n".join(files))
    return dest


def cache_dir(cfg: TrainerConfig) -> str:
    return cfg.runtime.model_cache_dir or os.path.join(cfg.runtime.work_dir, "models")


def model_dir(cfg: TrainerConfig) -> str:
    """The base model's local directory (downloaded or prepared when needed)."""
    return resolve_dir(cfg.model.uri, cache_dir(cfg), cfg.output)


def gguf_file(path: str) -> str | None:
    if os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(glob.glob(os.path.join(path, "*.gguf")))
    return os.path.basename(found[0]) if found else None


def weights_dtype(method: MethodSpec, on_gpu: bool) -> Any:
    """dtype of the base weights and the matmuls: the quantization's compute dtype for qlora on a GPU,
    else bf16 on GPU and fp32 on CPU."""
    if method.quantization is not None and on_gpu:
        return torch_dtype(method.quantization.compute_dtype)
    return torch.bfloat16 if on_gpu else torch.float32


def torch_dtype(name: str) -> Any:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def config_tokenizer(cfg: TrainerConfig, base_dir: str) -> Any:
    """spec.model.tokenizer, or the base model's own."""
    model: ModelSpec = cfg.model
    src = resolve_dir(model.tokenizer, cache_dir(cfg), cfg.output) if model.tokenizer else base_dir
    return load_tokenizer(src, model.trust_remote_code)


def load_tokenizer(src: str, trust_remote_code: bool = False) -> Any:
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gg := gguf_file(src):
        kw["gguf_file"] = gg
    tok = AutoTokenizer.from_pretrained(src, **kw)
    if not tok.is_fast:
        raise PermanentError("a fast tokenizer is required (offsets are used for prompt masking)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


ATTENTION_ENV = "SFTJOB_ATTENTION"  # sdpa | flex_attention: overrides the choice below (e.g. the GPU check)
ATTENTIONS = ("sdpa", "flex_attention")


def training_attention(on_gpu: bool, override: str | None = None) -> str:
    """transformers' attention implementation for training on packed rows (docs/performance.md).

    Both keep each packed sample to itself (transformers derives the documents from the restarting position
    ids): `flex_attention` on CUDA builds a block-sparse document mask and skips the blocks outside every
    sample; `sdpa` runs one kernel over the whole row with a block-diagonal boolean mask. torch 2.13's
    FlexAttention has no CPU backward, and on CPU it would compile a kernel per shape. The default is `sdpa`
    on every device until the GPU check has run FlexAttention (with selective checkpointing) on a GPU:
    `flex_attention` is opt-in on CUDA."""
    from transformers.utils.import_utils import is_torch_flex_attn_available

    if not override:
        return "sdpa"
    if override not in ATTENTIONS:
        raise PermanentError(f"{ATTENTION_ENV}={override!r}: expected one of {', '.join(ATTENTIONS)}")
    if override == "flex_attention" and not (on_gpu and is_torch_flex_attn_available()):
        raise PermanentError(f"{ATTENTION_ENV}=flex_attention needs a GPU (no CPU backward in torch)")
    return override


def disable_bnb_cpu_repack(model: Any) -> int:
    """bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs in eval mode, which later breaks DeepSpeed
    save_checkpoint (`assert packed_weight.dtype == torch.uint8`); opt every Linear4bit out."""
    import bitsandbytes as bnb  # here: only qlora runs load it (__main__.unused_optional_packages)

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):  # type: ignore[attr-defined]
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base(
    path: str, method: MethodSpec, dtype: Any, trust_remote_code: bool = False, attention: str | None = None
) -> Any:
    """The base causal LM in `dtype`, 4-bit quantized for qlora; `attention`: transformers' default if None."""
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if attention:
        kw["attn_implementation"] = attention
    if gg := gguf_file(path):
        kw["gguf_file"] = gg
    if method.type == "qlora":
        if "gguf_file" in kw:
            raise PermanentError("qlora needs a safetensors model; convert the GGUF file first")
        q = method.quantization or QuantizationSpec()
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=dtype,
            # ZeRO-3 partitions flat float tensors: store the packed 4-bit data in the compute dtype
            bnb_4bit_quant_storage=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise PermanentError(f"cannot load model from {path}: {e}") from e
    model.config.use_cache = False  # packing needs it off (see loss.py); also saves memory in training
    if method.type == "qlora":
        disable_bnb_cpu_repack(model)
    return model


def zero3_init(ds_config: dict[str, Any], method: MethodSpec) -> Any:
    """A transformers `HfDeepSpeedConfig` that makes `from_pretrained` build under zero.Init, or None.

    The caller keeps it alive until deepspeed.initialize: transformers and peft read it through a weak
    reference (peft then gathers partitioned base weights where it must, e.g. DoRA's norms and
    modules_to_save copies; plain LoRA only needs in/out features). None when:
    - the stage is not 3;
    - qlora: transformers never builds a quantized model under zero.Init (meta device, then every rank loads
      the 4-bit weights; DeepSpeed partitions them at initialize, as without this).
    """
    if ds_config["zero_optimization"]["stage"] != 3 or method.type == "qlora":
        return None
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def apply_method(model: Any, method: MethodSpec, training: TrainingSpec) -> Any:
    """Attach adapters (lora/qlora) or unfreeze everything (full); enable gradient checkpointing."""
    ckpt_kw = checkpointing_kwargs(training.checkpointing_policy)
    if method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kw,
        )
    elif training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kw)
    if method.type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    lc = method.lora
    targets = "all-linear" if lc.target_modules == ["all-linear"] else list(lc.target_modules)
    lora = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        task_type="CAUSAL_LM",
        target_modules=targets,
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        modules_to_save=list(lc.modules_to_save) or None,
    )
    model = get_peft_model(model, lora)
    if not torch.cuda.is_available():  # CUDA's fused dropout is already cheap
        use_fast_lora_dropout(model)
    return model


def load_for_training(cfg: TrainerConfig, on_gpu: bool) -> tuple[Any, Any]:
    """(model, tokenizer) ready to be handed to DeepSpeed."""
    base_dir = model_dir(cfg)
    tok = config_tokenizer(cfg, base_dir)
    attention = training_attention(on_gpu, os.environ.get(ATTENTION_ENV))
    dtype = weights_dtype(cfg.method, on_gpu)
    base = load_base(base_dir, cfg.method, dtype, cfg.model.trust_remote_code, attention)
    return apply_method(base, cfg.method, cfg.training), tok


def load_trained(cfg: TrainerConfig, base_dir: str, trained_dir: str, dtype: Any) -> Any:
    """The trained model for eval: base + adapter from `trained_dir`, or the full model saved there."""
    if cfg.method.type == "full":
        return load_base(trained_dir, cfg.method, dtype, cfg.model.trust_remote_code)
    base = load_base(base_dir, cfg.method, dtype, cfg.model.trust_remote_code)
    return PeftModel.from_pretrained(base, trained_dir)
