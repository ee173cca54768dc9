"""Fuzzing the trainer's data loader (issue 14, part 6): generated dataset files — malformed JSON lines, wrong
types per field, BOM, CRLF, invalid UTF-8, empty files, empty responses, enormous rows, deep nesting, null
bytes, mixed formats — through `records.iter_jsonl` and `data.load_dataset` with a real tokenizer.

Every file either loads with per-reason drop counts that add up (kept + dropped = rows) and every example
naming its file:line, or fails with `PermanentError` naming the file (and a file:line when it has rows);
never another exception. The hang check is the test's own timeout. `SFTJOB_CHAOS_FULL=1` runs the published
count (docs/reliability.md), `SFTJOB_FUZZ_EXAMPLES=N` any count.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftjob_api.dataset import DatasetSpec
from sftjob_api.exit_codes import PermanentError
from sftjob_trainer.data import load_dataset
from sftjob_trainer.records import DropReport, iter_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.chaos, pytest.mark.timeout(900)]

FULL = os.environ.get("SFTJOB_CHAOS_FULL", "") not in ("", "0")
EXAMPLES = int(os.environ.get("SFTJOB_FUZZ_EXAMPLES") or (1000 if FULL else 80))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not FULL,  # CI: the same files every run; the full run explores
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), text)
value = st.recursive(
    scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8
)
good_alpaca = st.fixed_dictionaries(
    {"instruction": text.filter(str.strip), "output": text.filter(str.strip)}, optional={"input": text}
)
messages_row = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant", "tool", "", 7]), "content": value}
            ),
            max_size=4,
        )
    }
)
wrong_types = st.fixed_dictionaries(
    {"instruction": value, "output": value}, optional={"input": value, "extra": value}
)
prompt_completion = st.fixed_dictionaries({"prompt": value, "completion": value})


def _json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


raw_line = st.one_of(
    good_alpaca.map(_json),
    good_alpaca.map(lambda r: {**r, "output": " \t"}).map(_json),  # empty response
    wrong_types.map(_json),
    messages_row.map(_json),  # mixed formats in one file
    prompt_completion.map(_json),
    value.map(_json),  # not an object, or an object of anything
    good_alpaca.map(_json).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # truncated
    st.binary(max_size=30),  # invalid UTF-8, null bytes, control characters
    good_alpaca.map(_json).map(lambda b: b[:5] + b"\x00" + b[5:]),  # a null byte inside
    good_alpaca.map(_json).map(lambda b: b[:-2] + b"\xff\xfe" + b[-2:]),  # invalid UTF-8 inside a string
    st.integers(2_000, 200_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(20_000, 300_000).map(lambda n: _json({"instruction": "say", "output": "x " * n})),  # enormous
    st.just(b""),
    st.just(b"   "),
)


@st.composite
def jsonl_file(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(raw_line, max_size=12))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = eol.join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines)
    if draw(st.booleans()):
        body += eol
    if draw(st.booleans()):
        body = codecs.BOM_UTF8 + body
    return body


def _dataset(fmt: str) -> DatasetSpec:
    return DatasetSpec(train=["/unused"], format=fmt, max_seq_length=64)


FIGURES: Counter[str] = Counter()  # files by outcome, rows by drop reason (printed, and for the doc)


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    yield
    text = json.dumps(dict(sorted(FIGURES.items())), indent=1)
    print(f"\ndata fuzz figures:\n{text}")
    out = os.environ.get("SFTJOB_CHAOS_REPORT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "test_data_fuzz.json").write_text(text + "\n")


@FUZZ
@given(data=jsonl_file(), fmt=st.sampled_from(["alpaca", "messages", "prompt_completion"]))
def test_loader_never_crashes_and_counts_add_up(
    tiny_tokenizer, tmp_path_factory, data: bytes, fmt: str
) -> None:
    path = str(tmp_path_factory.mktemp("fuzz") / "train.jsonl")
    with open(path, "wb") as f:
        f.write(data)
    try:
        examples, report = load_dataset([path], tiny_tokenizer, _dataset(fmt))
    except PermanentError as e:
        msg = str(e)
        assert path in msg, msg
        if "empty" not in msg:
            assert re.search(re.escape(path) + r":\d+", msg), msg  # names the file and a line
        FIGURES[
            "files: permanent error, empty" if "empty" in msg else "files: permanent error, file:line"
        ] += 1
        return
    FIGURES["files: trained"] += 1
    FIGURES["rows: total"] += report.total_rows
    FIGURES["rows: kept"] += report.kept_rows
    for reason, n in report.dropped.items():
        FIGURES[f"rows dropped: {reason}"] += n
    assert examples
    assert report.kept_rows == len(examples)
    assert report.kept_rows + sum(report.dropped.values()) == report.total_rows, report.as_dict()
    for reason, where in report.examples.items():
        assert reason in report.dropped
        assert all(re.match(re.escape(path) + r":\d+", w) for w in where), where


def test_bom_crlf_and_invalid_utf8_are_read_not_replaced(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    good = b'{"instruction": "a", "output": "b"}'
    path.write_bytes(codecs.BOM_UTF8 + good + b"\r\n" + b'{"instruction": "\xff", "output": "b"}\r\n' + good)
    report = DropReport()
    rows = list(iter_jsonl(str(path), "d.jsonl", report))
    assert [r.where for r in rows] == ["d.jsonl:1", "d.jsonl:3"]  # the BOM line is a row, not malformed
    assert rows[0].data == {"instruction": "a", "output": "b"}
    assert report.total_rows == 3 and dict(report.dropped) == {"invalid_utf8": 1}
    assert report.examples["invalid_utf8"] == ["d.jsonl:2: byte 17: invalid start byte"]


def test_deep_nesting_and_wrong_types_are_drop_reasons(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b'\n{"instruction": 1, "output": "b"}\n')
    report = DropReport()
    assert [r.where for r in iter_jsonl(str(path), "d.jsonl", report)] == ["d.jsonl:2"]
    assert report.examples["malformed_json"] == ["d.jsonl:1: JSON nested too deeply"]


def test_empty_file_is_permanent_naming_it(tiny_tokenizer, tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n  \r\n")
    with pytest.raises(PermanentError, match=r"empty\.jsonl: empty"):
        load_dataset([str(path)], tiny_tokenizer, _dataset("alpaca"))
