"""Turning a raw row into text plus the character spans that are trained on (torch-free, pure).

Every format ends as `Formatted(text, spans)`: only characters inside `spans` (assistant answers and the
end-of-turn / EOS marker after each) produce labels; system, user and prompt text never do. Tokenization
later labels a token iff it starts inside a span, so masking is decided once, on text, for all formats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sftjob_api.dataset import FieldMapping

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# The keys inside each message of the messages format (spec.dataset.fieldMapping names the columns).
ROLE, CONTENT = "role", "content"


class ChatTokenizer(Protocol):
    eos_token: str | None
    chat_template: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Formatted:
    text: str
    spans: tuple[tuple[int, int], ...]  # [start, end) character ranges that are trained on


class RowError(ValueError):
    """A row that cannot be used; `reason` is a drop-report key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def row_field(row: Mapping[str, Any], key: str, required: bool = True) -> Any:
    val = row.get(key)
    if val is None and required:
        raise RowError("missing_field", f"missing field {key!r}")
    return val


def string_field(val: Any, key: str) -> str:
    if not isinstance(val, str):
        raise RowError("wrong_type", f"field {key!r} is {type(val).__name__}, not a string")
    return val


def _render(tok: ChatTokenizer, msgs: list[dict[str, str]], gen_prompt: bool) -> str:
    try:
        out = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    except Exception as e:  # the template's own checks (jinja raise_exception: roles, order)
        raise RowError("template_error", f"chat template refused the conversation: {e}") from e
    return str(out)


def format_messages(tok: ChatTokenizer, msgs: list[dict[str, str]]) -> Formatted:
    """Render with the chat template; spans cover each assistant turn incl. its end-of-turn marker.

    Each assistant span is found by rendering the prefix before it (with the generation prompt) and the
    prefix through it: the template must be prefix-stable, which we check instead of assuming.
    """
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("empty_response", "no assistant turn")
    full = _render(tok, msgs, gen_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip():
            raise RowError("empty_response", f"assistant turn {i} is empty")
        before = _render(tok, msgs[:i], gen_prompt=True) if i else ""
        through = _render(tok, msgs[: i + 1], gen_prompt=False)
        if not full.startswith(through) or not through.startswith(before):
            raise RowError("template_error", "chat template is not prefix-stable for this conversation")
        spans.append((len(before), len(through)))
    return Formatted(full, tuple(spans))


def _pair(tok: ChatTokenizer, prompt: str, completion: str, use_template: bool) -> Formatted:
    if not completion.strip():
        raise RowError("empty_response", "empty response")
    if use_template:
        return format_messages(
            tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        )
    eos = tok.eos_token or ""
    return Formatted(prompt + completion + eos, ((len(prompt), len(prompt) + len(completion) + len(eos)),))


def format_row(
    row: Mapping[str, Any],
    fmt: str,
    tok: ChatTokenizer,
    fields: FieldMapping | None = None,
    use_chat_template: bool | None = None,
) -> Formatted:
    """Format one row (columns named by `fields`, spec.dataset.fieldMapping). `use_chat_template=None`
    means: use it when the tokenizer has one."""
    f = fields or FieldMapping()
    templ = bool(tok.chat_template) if use_chat_template is None else use_chat_template
    if fmt == "alpaca":
        instr = string_field(row_field(row, f.instruction), f.instruction)
        inp = string_field(row_field(row, f.input, required=False) or "", f.input)
        out = string_field(row_field(row, f.output), f.output)
        if templ:
            prompt = instr + (f"\n\n{inp}" if inp else "")
        else:
            prompt = ALPACA_PROMPT.format(
                ctx=", paired with an input that provides further context" if inp else "",
                instruction=instr,
                input_block=f"### Input:\n{inp}\n\n" if inp else "",
            )
        return _pair(tok, prompt, out, templ)
    if fmt == "prompt_completion":
        prompt = string_field(row_field(row, f.prompt), f.prompt)
        comp = string_field(row_field(row, f.completion), f.completion)
        return _pair(tok, prompt, comp, templ)
    if fmt == "messages":
        raw = row_field(row, f.messages)
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise RowError("missing_field", f"field {f.messages!r} is not a non-empty list")
        msgs: list[dict[str, str]] = []
        for m in raw:
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get(ROLE), str)
                or not isinstance(m.get(CONTENT), str)
            ):
                raise RowError("missing_field", "a message lacks a string role/content")
            msgs.append({"role": m[ROLE], "content": m[CONTENT]})
        if not templ:
            raise RowError("template_error", "messages format needs a tokenizer with a chat template")
        return format_messages(tok, msgs)
    raise ValueError(f"unknown dataset format {fmt!r}")
