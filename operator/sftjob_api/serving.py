"""Serving hand-off: can the server named in `spec.output.serving` load the adapter this spec trains?

The rules, one table per server, with their sources (docs/serving.md has the links):

- vLLM refuses DoRA adapters ("vLLM does not yet support DoRA", `vllm/lora/peft_helper.py`; vllm#6983,
  vllm#10849) and any `modules_to_save` ("vLLM only supports modules_to_save being None"; vllm#9280);
  `--max-lora-rank` is one of `MaxLoRARanks` = 1, 8, 16, 32, 64, 128, 256, 320, 512 (`vllm/config/lora.py`,
  default 16) and an adapter whose r exceeds it is refused ("is greater than max_lora_rank"), so r <= 512;
  target modules must be layers vLLM's LoRA implementation knows ("expected target modules in ...").
- TGI reads only r, lora_alpha, target_modules, fan_in_fan_out and use_rslora from adapter_config.json
  (`server/text_generation_server/adapters/lora.py`): DoRA magnitude vectors and `modules_to_save` weights
  are left unused with a warning, i.e. the served model silently differs from the trained one. Ranks have no
  hard limit (above 128 its punica kernels fall back to a slower loop).

The rule this project applies (docs/serving.md): a spec whose adapter the server cannot load is handed off as
the merged model when the merge stage runs (status.artifacts.serving says so and why), and is refused at
admission (CEL in the CRD, the same predicate in pydantic) when merge is disabled. Method full hands off the
full model, which any server loads.

Pure and torch-free; spec.py attaches `cel_rules()` to SFTJobSpec (this module does not import the spec).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .base import CelRule

Server = Literal["none", "vllm", "tgi"]
SERVERS: tuple[str, ...] = ("none", "vllm", "tgi")

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]; default 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# The projections of the Llama-family decoders (Llama, Mistral, Qwen2/3, Gemma, SmolLM2) both servers apply
# LoRA to; "all-linear" is peft's shorthand for exactly these on such models (the output head excluded).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ServerRules:
    """What one server loads from a peft LoRA adapter."""

    title: str
    dora: bool
    modules_to_save: bool
    max_rank: int | None
    target_modules: tuple[str, ...]
    refs: dict[str, str]  # feature -> where the rule comes from


RULES: dict[str, ServerRules] = {
    "vllm": ServerRules(
        title="vLLM",
        dora=False,
        modules_to_save=False,
        max_rank=max(VLLM_MAX_LORA_RANKS),
        target_modules=(ALL_LINEAR, *LLAMA_PROJECTIONS),
        refs={
            "dora": "vllm#6983, vllm#10849",
            "modules_to_save": "vllm#9280",
            "rank": "max_lora_rank choices 1..512",
            "targets": "vLLM LoRA layers",
        },
    ),
    "tgi": ServerRules(
        title="TGI",
        dora=False,
        modules_to_save=False,
        max_rank=None,
        target_modules=(ALL_LINEAR, *LLAMA_PROJECTIONS),
        refs={
            "dora": "TGI ignores use_dora",
            "modules_to_save": "TGI ignores modules_to_save",
            "targets": "TGI adapter layers",
        },
    ),
}


@dataclass(frozen=True)
class Problem:
    """Why a server cannot load the adapter: the spec field (relative to spec) and the reason."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"spec.{self.field}: {self.reason}"


@dataclass(frozen=True)
class _Feature:
    key: str
    field: str  # relative to spec
    cel_ok: Callable[[ServerRules], str]  # CEL, true when the server can load it
    ok: Callable[[ServerRules, Any], bool]  # the same predicate on a LoraSpec
    reason: Callable[[ServerRules], str]


def _targets_cel(r: ServerRules) -> str:
    return f"self.method.lora.targetModules.all(m, m in {json.dumps(list(r.target_modules))})"


FEATURES = (
    _Feature(
        "dora",
        "method.lora.useDora",
        lambda r: "!self.method.lora.useDora",
        lambda r, lora: r.dora or not lora.use_dora,
        lambda r: f"{r.title} cannot load DoRA adapters ({r.refs['dora']})",
    ),
    _Feature(
        "modules_to_save",
        "method.lora.modulesToSave",
        lambda r: "size(self.method.lora.modulesToSave) == 0",
        lambda r, lora: r.modules_to_save or not lora.modules_to_save,
        lambda r: f"{r.title} cannot load adapters with modulesToSave ({r.refs['modules_to_save']})",
    ),
    _Feature(
        "rank",
        "method.lora.r",
        lambda r: f"self.method.lora.r <= {r.max_rank}",
        lambda r, lora: r.max_rank is None or lora.r <= r.max_rank,
        lambda r: f"{r.title} loads LoRA ranks up to {r.max_rank} ({r.refs.get('rank', '')})",
    ),
    _Feature(
        "targets",
        "method.lora.targetModules",
        _targets_cel,
        lambda r, lora: all(m in r.target_modules for m in lora.target_modules),
        lambda r: f"{r.title} applies LoRA only to {', '.join(r.target_modules)} ({r.refs['targets']})",
    ),
)


def _applies(r: ServerRules, f: _Feature) -> bool:
    """Whether the server restricts this feature at all."""
    return {"dora": not r.dora, "modules_to_save": not r.modules_to_save, "rank": r.max_rank is not None}.get(
        f.key, True
    )


def lora_problems(server: str, lora: Any) -> list[Problem]:
    """What stops `server` from loading an adapter trained with `lora` (a LoraSpec); [] when it can."""
    rules = RULES.get(server)
    if rules is None:
        return []
    return [
        Problem(f.field, f.reason(rules)) for f in FEATURES if _applies(rules, f) and not f.ok(rules, lora)
    ]


def adapter_needs_merge(spec: Any) -> list[Problem]:
    """The problems that make the merged model the hand-off (none for method full: no adapter)."""
    if spec.method.type == "full":
        return []
    return lora_problems(spec.output.serving, spec.method.lora)


def cel_rules() -> tuple[CelRule, ...]:
    """One rule per (server, feature) on SFTJobSpec: refused only when merge is off (nothing else to serve)."""
    out = []
    for server, rules in RULES.items():
        for f in FEATURES:
            if not _applies(rules, f):
                continue
            out.append(
                CelRule(
                    cel=f"self.output.serving != '{server}' || self.method.type == 'full'"
                    f" || self.merge.enabled || ({f.cel_ok(rules)})",
                    message=f"output.serving {server}: {f.reason(rules)}, and merge.enabled is false:"
                    f" change {f.field}, or enable merge to hand off the merged model (docs/serving.md)",
                    check=_check(server, f),
                    field_path=f".{f.field}",
                )
            )
    return tuple(out)


def _check(server: str, f: _Feature) -> Callable[[Any], bool]:
    rules = RULES[server]

    def check(spec: Any) -> bool:
        return (
            spec.output.serving != server
            or spec.method.type == "full"
            or spec.merge.enabled
            or f.ok(rules, spec.method.lora)
        )

    return check


def smallest_max_lora_rank(r: int) -> int:
    """The `--max-lora-rank` vLLM needs for an adapter of rank r (the smallest allowed choice >= r)."""
    return next(c for c in VLLM_MAX_LORA_RANKS if c >= r)


def adapter_config_problems(server: str, doc: dict[str, Any]) -> list[str]:
    """The documented rules applied to a written adapter_config.json (what the server itself checks on load)."""
    rules = RULES.get(server)
    if rules is None:
        return []
    out = []
    if doc.get("use_dora") and not rules.dora:
        out.append(f"use_dora: {rules.refs['dora']}")
    if doc.get("modules_to_save") and not rules.modules_to_save:
        out.append(f"modules_to_save {doc['modules_to_save']}: {rules.refs['modules_to_save']}")
    if rules.max_rank is not None and int(doc.get("r", 0)) > rules.max_rank:
        out.append(f"r {doc.get('r')} > {rules.max_rank}")
    targets = doc.get("target_modules") or []
    names = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in names if t.rsplit(".", 1)[-1] not in rules.target_modules]
    if bad:
        out.append(f"target_modules {sorted(bad)} not in {list(rules.target_modules)}")
    if doc.get("bias", "none") != "none":
        out.append(f"bias {doc.get('bias')}: adapter biases are not loaded")
    return out
