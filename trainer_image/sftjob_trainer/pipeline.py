"""Config -> model spec and tokenized data; shared by train, eval and merge (issue: eval/merge stages)."""

from __future__ import annotations

import os
from typing import Any

from .config import TrainerConfig
from .data import Example, load_dataset, split
from .model import LoraSpec, ModelSpec, QuantSpec
from .records import DropReport


def model_spec(cfg: TrainerConfig, on_gpu: bool) -> ModelSpec:
    m = cfg.method
    q = m.quantization
    dtype = "auto"
    if q is not None and on_gpu:
        dtype = q.compute_dtype
    targets: list[str] | str = list(m.lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return ModelSpec(
        uri=cfg.model.uri, method=m.type, tokenizer_uri=cfg.model.tokenizer,
        trust_remote_code=cfg.model.trust_remote_code,
        lora=LoraSpec(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=targets,
                      use_dora=m.lora.use_dora, use_rslora=m.lora.use_rslora),
        quant=QuantSpec(quant_type=q.quant_type, double_quant=q.double_quant) if q else QuantSpec(),
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        checkpointing_policy=cfg.training.checkpointing_policy, dtype=dtype)


def cache_dir(cfg: TrainerConfig) -> str:
    return cfg.runtime.model_cache_dir or os.path.join(cfg.runtime.work_dir, "models")


def prepare_examples(cfg: TrainerConfig, tok: Any) -> tuple[list[Example], list[Example], DropReport]:
    """(train, eval, report): the same deterministic split on every rank, restart and stage."""
    ds = cfg.dataset
    fm = ds.field_mapping
    fields = {"instruction": fm.instruction, "input": fm.input, "output": fm.output,
              "messages": fm.messages, "prompt": fm.prompt, "completion": fm.completion}
    kw: dict[str, Any] = {"max_seq_len": ds.max_seq_length, "fields": fields,
                          "min_tokens": ds.filter.min_tokens, "max_tokens": ds.filter.max_tokens,
                          "dedup": ds.filter.dedup, "cache_dir": os.path.join(cfg.runtime.work_dir, "data")}
    examples, report = load_dataset(list(ds.train), tok, ds.format, **kw)
    if ds.eval:
        ev, _ = load_dataset(list(ds.eval), tok, ds.format, **kw)
        return examples, ev, report
    train, ev = split(examples, ds.eval_split, cfg.training.seed)
    return train, ev, report
