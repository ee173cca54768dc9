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
