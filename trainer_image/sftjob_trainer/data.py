"""Dataset pipeline: rows -> formatted text -> token ids + labels -> filtered, deduplicated, split.

Torch-free (lists of ints) so it is cheap to test and reusable by eval. Labels are -100 everywhere except
on tokens that start inside a trainable span (see formatting.py).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from sftjob_api.dataset import DatasetSpec, FieldMapping
from sftjob_api.exit_codes import PermanentError
from sftjob_api.spec import OutputSpec

from .formatting import Formatted, RowError, format_row
from .records import DropReport, Row, iter_rows

IGNORE = -100
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def labels_from_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: Iterable[tuple[int, int]]
) -> list[int]:
    """A token is trained on iff its first character lies inside a span (zero-width tokens never are)."""
    sp = sorted(spans)
    out = []
    for tid, (s, e) in zip(ids, offsets, strict=True):
        inside = e > s and any(a <= s < b for a, b in sp)
        out.append(tid if inside else IGNORE)
    return out


def truncate(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Keep the first max_len tokens; if that window has no label, slide it so the answer starts mid-window.

    Never returns a window without a trainable token when the input had one.
    """
    if len(ids) <= max_len:
        return ids, labels
    if any(x != IGNORE for x in labels[:max_len]):
        return ids[:max_len], labels[:max_len]
    first = next((i for i, x in enumerate(labels) if x != IGNORE), None)
    if first is None:
        return ids[:max_len], labels[:max_len]
    start = max(0, min(first - max_len // 2, len(ids) - max_len))
    return ids[start : start + max_len], labels[start : start + max_len]


def tokenize_batch(tok: Any, items: list[Formatted], raw_text: bool) -> list[tuple[list[int], list[int]]]:
    """Tokenize many texts in one fast-tokenizer call; chat-template text already holds its specials."""
    enc = tok([f.text for f in items], add_special_tokens=raw_text, return_offsets_mapping=True)
    out = []
    for f, ids, offs in zip(items, enc["input_ids"], enc["offset_mapping"], strict=True):
        offs = [tuple(o) for o in offs]
        out.append((list(ids), labels_from_offsets(ids, offs, f.spans)))
    return out


def build_examples(
    rows: Iterable[Row],
    tok: Any,
    fmt: str,
    report: DropReport,
    *,
    max_seq_len: int,
    fields: FieldMapping | None = None,
    use_chat_template: bool | None = None,
    min_tokens: int = 1,
    max_tokens: int | None = None,
    truncation: str = "right",  # "right" (keep the answer, see truncate) or "drop"
    dedup: bool = True,
    batch_size: int = 512,
) -> list[Example]:
    templ = bool(tok.chat_template) if use_chat_template is None else use_chat_template
    seen: set[bytes] = set()
    out: list[Example] = []
    pending: list[tuple[Formatted, str]] = []

    def flush() -> None:
        if not pending:
            return
        for (_f, where), (ids, labels) in zip(
            pending, tokenize_batch(tok, [p[0] for p in pending], not templ), strict=True
        ):
            if max_tokens is not None and len(ids) > max_tokens:
                report.drop("too_long", where, f"{len(ids)} tokens > max {max_tokens}")
                continue
            if len(ids) < min_tokens:
                report.drop("too_short", where, f"{len(ids)} tokens < min {min_tokens}")
                continue
            if len(ids) > max_seq_len:
                if truncation == "drop":
                    report.drop("too_long", where, f"{len(ids)} tokens > max_seq_len {max_seq_len}")
                    continue
                ids, labels = truncate(ids, labels, max_seq_len)
            ex = Example(ids, labels)
            if ex.n_labels == 0:
                report.drop("no_trainable_tokens", where, "no answer token survived tokenization")
                continue
            out.append(ex)
        pending.clear()

    for row in rows:
        try:
            f = format_row(row.data, fmt, tok, fields, templ)
        except RowError as e:
            report.drop(e.reason, row.where, str(e))
            continue
        if dedup:
            h = hashlib.blake2b(f.text.encode(), digest_size=16).digest()
            if h in seen:
                report.drop("duplicate", row.where)
                continue
            seen.add(h)
        pending.append((f, row.where))
        if len(pending) >= batch_size:
            flush()
    flush()
    report.kept_rows = len(out)
    return out


def split(examples: list[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic train/eval split (same seed, same split on every rank and every restart); also splits
    the align stage's preference pairs."""
    if eval_fraction <= 0 or len(examples) < 2:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    ev = sorted(idx[:n_eval])
    tr = sorted(idx[n_eval:])
    return [examples[i] for i in tr], [examples[i] for i in ev]


def load_dataset(
    uris: list[str],
    tok: Any,
    ds: DatasetSpec,
    cache_dir: str | None = None,
    output: OutputSpec | None = None,
) -> tuple[list[Example], DropReport]:
    """Read, format, tokenize, filter as spec.dataset says. Empty result is a permanent error naming the drop
    reasons. S3 files are read with spec.output's client settings."""
    report = DropReport()
    rows = iter_rows(uris, report, cache_dir, output)
    examples = build_examples(
        rows,
        tok,
        ds.format,
        report,
        max_seq_len=ds.max_seq_length,
        fields=ds.field_mapping,
        min_tokens=ds.filter.min_tokens,
        max_tokens=ds.filter.max_tokens,
        dedup=ds.filter.dedup,
    )
    if not examples:
        if report.total_rows == 0:
            raise PermanentError(f"no training rows in {', '.join(uris)}: empty (no non-blank line)")
        raise PermanentError(f"no usable training rows in {', '.join(uris)}: {report.summary()}")
    return examples, report
