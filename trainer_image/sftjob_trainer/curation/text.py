"""A row's words, independent of the chat template: what near-duplicate and contamination checks compare.

`content_of` pulls the prompt side and the answer side out of a raw row of any format (the template's
boilerplate would make every row look alike). Rows it cannot read return None: formatting later drops them
with the precise reason (missing_field, ...), so curation never reports them twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftjob_api.dataset import FieldMapping

from ..formatting import CONTENT, ROLE

WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Content:
    prompt: str
    answer: str
    key: tuple[tuple[str, str], ...]  # (role, text) turns: identical keys are exact duplicates

    @property
    def text(self) -> str:
        return f"{self.prompt}\n{self.answer}"


def _s(row: Mapping[str, Any], key: str) -> str | None:
    v = row.get(key)
    return v if isinstance(v, str) else None


def content_of(row: Mapping[str, Any], fmt: str, fields: FieldMapping) -> Content | None:
    turns: list[tuple[str, str]] = []
    if fmt == "alpaca":
        instr, out = _s(row, fields.instruction), _s(row, fields.output)
        if instr is None or out is None:
            return None
        turns = [("user", instr), ("user", _s(row, fields.input) or ""), ("assistant", out)]
    elif fmt == "prompt_completion":
        prompt, comp = _s(row, fields.prompt), _s(row, fields.completion)
        if prompt is None or comp is None:
            return None
        turns = [("user", prompt), ("assistant", comp)]
    elif fmt == "messages":
        raw = row.get(fields.messages)
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            return None
        for m in raw:
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get(ROLE), str)
                or not isinstance(m.get(CONTENT), str)
            ):
                return None
            turns.append((m[ROLE], m[CONTENT]))
    else:
        return None
    prompt = "\n".join(t for r, t in turns if r != "assistant" and t)
    answer = "\n".join(t for r, t in turns if r == "assistant")
    return Content(prompt, answer, tuple(turns))


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation and whitespace ignored)."""
    return WORD.findall(text.lower())


def ngrams(ws: Sequence[str], n: int) -> set[str]:
    """Word n-grams as strings; a text shorter than n words is one n-gram of all its words."""
    if len(ws) < n:
        return {" ".join(ws)} if ws else set()
    return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def snippet(text: str, limit: int = 120) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"
