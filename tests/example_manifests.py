"""The shipped example manifests, shared by the unit tests (pydantic) and the e2e tests (API server)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class InvalidExample:
    path: Path
    field: str  # the field path every error message must name
    message: str | None  # the rule's message (cross-field rules), when both sides share it

    def load(self) -> dict[str, Any]:
        doc: dict[str, Any] = yaml.safe_load(self.path.read_text())
        return doc


def _header(path: Path, key: str) -> str | None:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}: "):
            return line.split(": ", 1)[1].strip()
    return None


def invalid_examples() -> list[InvalidExample]:
    out = []
    for path in sorted((EXAMPLES / "invalid").glob("*.yaml")):
        field = _header(path, "field")
        assert field, f"{path} lacks a '# field:' header"
        out.append(InvalidExample(path, field, _header(path, "message")))
    return out


def valid_examples() -> list[Path]:
    return sorted(EXAMPLES.glob("sftjob-*.yaml"))


# Serving hand-off (docs/serving.md): (server, lora settings it cannot load, the field an error must name).
SERVING_INCOMPATIBLE = [
    ("vllm", {"useDora": True}, "spec.method.lora.useDora"),
    ("vllm", {"modulesToSave": ["lm_head"]}, "spec.method.lora.modulesToSave"),
    ("vllm", {"r": 1024}, "spec.method.lora.r"),
    ("vllm", {"targetModules": ["q_proj", "lm_head"]}, "spec.method.lora.targetModules"),
    ("vllm", {"targetModules": ["embed_tokens"]}, "spec.method.lora.targetModules"),
    ("tgi", {"useDora": True}, "spec.method.lora.useDora"),
    ("tgi", {"modulesToSave": ["embed_tokens"]}, "spec.method.lora.modulesToSave"),
    ("tgi", {"targetModules": ["lm_head"]}, "spec.method.lora.targetModules"),
]


def serving_manifest(
    server: str,
    lora: dict[str, Any] | None = None,
    merge: bool = True,
    method: str = "lora",
    name: str = "serve",
) -> dict[str, Any]:
    """An SFTJob handing its result to `server`."""
    return {
        "apiVersion": "sft.tuning.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/smollm2-135m-instruct"},
            "dataset": {"train": ["s3://datasets/a.jsonl"]},
            "method": {"type": method, "lora": lora or {}},
            "output": {"uri": "s3://artifacts/sft", "serving": server},
            "merge": {"enabled": merge},
        },
    }
