"""Formatting, prompt masking, filtering and the drop report (no model needed, only the tokenizer)."""

from __future__ import annotations

import json

import pytest

from sftjob_api.dataset import DatasetSpec, FieldMapping, FilterSpec
from sftjob_api.exit_codes import PermanentError
from sftjob_trainer.data import IGNORE, build_examples, load_dataset, split, truncate
from sftjob_trainer.formatting import format_row
from sftjob_trainer.records import DropReport, iter_rows

pytestmark = pytest.mark.trainer


def labelled_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_messages_train_only_assistant_turns_with_end_marker(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    conv = [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "repeat red cat"},
        {"role": "assistant", "content": "red cat"},
        {"role": "user", "content": "reverse one two"},
        {"role": "assistant", "content": "two one"},
    ]
    report = DropReport()
    rows = iter_rows([_jsonl(tmp_path, [{"messages": conv}])], report)
    [ex] = build_examples(rows, tok, "messages", report, max_seq_len=256)
    assert labelled_text(tok, ex) == "red cat<|im_end|>\ntwo one<|im_end|>\n"
    # every labelled token is where the input has the same token (labels are unshifted copies)
    assert all(lab in (IGNORE, tid) for lab, tid in zip(ex.labels, ex.input_ids, strict=True))
    # the user/system text is fully masked
    assert "repeat" not in labelled_text(tok, ex) and "short" not in labelled_text(tok, ex)


def test_alpaca_without_template_trains_response_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    f = format_row(
        {"instruction": "repeat", "input": "red cat", "output": "red cat"},
        "alpaca",
        tok,
        use_chat_template=False,
    )
    assert f.text.endswith("### Response:\nred cat</s>")
    [(a, b)] = f.spans
    assert f.text[a:b] == "red cat</s>"


def test_prompt_completion_with_field_mapping(tiny_tokenizer):
    f = format_row(
        {"q": "one two", "a": "two one"},
        "prompt_completion",
        tiny_tokenizer,
        FieldMapping(prompt="q", completion="a"),
        use_chat_template=False,
    )
    [(a, b)] = f.spans
    assert f.text[:a] == "one two" and f.text[a:b] == "two one</s>"


def settings(fmt: str, max_seq_len: int, **filters) -> DatasetSpec:
    """spec.dataset's settings (the files are passed to load_dataset separately: train or eval)."""
    return DatasetSpec(
        train=["/unused"], format=fmt, max_seq_length=max_seq_len, filter=FilterSpec(**filters)
    )


def _jsonl(tmp_path, rows, raw_lines=()):
    p = tmp_path / "data.jsonl"
    with open(p, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")
    return str(p)


def test_drop_report_names_file_and_line(tiny_tokenizer, tmp_path):
    good = {"instruction": "repeat", "input": "red", "output": "red"}
    path = _jsonl(
        tmp_path,
        [good, good, {"instruction": "x", "output": "  "}, {"input": "no instr"}],
        raw_lines=['{"instruction": "broken', "[1, 2]"],
    )
    examples, report = load_dataset([path], tiny_tokenizer, settings("alpaca", 128))
    assert len(examples) == 1
    assert report.total_rows == 6 and report.kept_rows == 1
    assert report.dropped == {"duplicate": 1, "empty_response": 1, "missing_field": 1, "malformed_json": 2}
    assert report.examples["malformed_json"][0].startswith(f"{path}:5: ")
    assert report.examples["malformed_json"][1].startswith(f"{path}:6: ")
    assert report.examples["duplicate"] == [f"{path}:2"]


def test_empty_after_filtering_is_permanent_error(tiny_tokenizer, tmp_path):
    path = _jsonl(tmp_path, [], raw_lines=["not json at all"])
    with pytest.raises(PermanentError, match=r"malformed_json=1 .*data.jsonl:1"):
        load_dataset([path], tiny_tokenizer, settings("alpaca", 128))


def test_min_max_token_filters(tiny_tokenizer, tmp_path):
    rows = [{"instruction": "repeat", "input": " ".join(["red"] * n), "output": "x"} for n in (1, 5, 40)]
    path = _jsonl(tmp_path, rows)
    short, mid, long = (
        len(e.input_ids) for e in load_dataset([path], tiny_tokenizer, settings("alpaca", 512))[0]
    )
    assert short < mid < long
    examples, report = load_dataset(
        [path], tiny_tokenizer, settings("alpaca", 512, min_tokens=mid, max_tokens=mid)
    )
    assert report.dropped["too_short"] == 1 and report.dropped["too_long"] == 1
    assert [len(e.input_ids) for e in examples] == [mid]


def test_truncation_keeps_trainable_tokens():
    ids = list(range(100))
    labels = [IGNORE] * 90 + list(range(90, 100))
    t_ids, t_labels = truncate(ids, labels, 32)
    assert len(t_ids) == 32 and any(x != IGNORE for x in t_labels)
    assert t_ids[0] == 100 - 32  # the answer is short: the window ends with it
    long_answer = [IGNORE] * 90 + list(range(90, 200))
    assert truncate(list(range(200)), long_answer, 32)[0][0] == 90 - 16  # half prompt, half answer
    assert truncate(ids, labels, 100) == (ids, labels)


def test_long_prompt_is_truncated_not_dropped(tiny_tokenizer, tmp_path):
    row = {"instruction": "repeat " * 200, "input": "", "output": "red cat"}
    examples, _ = load_dataset([_jsonl(tmp_path, [row])], tiny_tokenizer, settings("alpaca", 64))
    assert len(examples[0].input_ids) == 64 and examples[0].n_labels > 0


def test_split_is_deterministic_and_disjoint(tiny_tokenizer, tmp_path):
    from tests.trainer.tiny import dataset_rows

    examples, _ = load_dataset([_jsonl(tmp_path, dataset_rows(50))], tiny_tokenizer, settings("alpaca", 128))
    tr1, ev1 = split(examples, 0.1, seed=3)
    tr2, ev2 = split(examples, 0.1, seed=3)
    assert tr1 == tr2 and ev1 == ev2 and len(ev1) == round(len(examples) * 0.1)
    assert len(tr1) + len(ev1) == len(examples)
    assert {tuple(e.input_ids) for e in ev1}.isdisjoint({tuple(e.input_ids) for e in tr1})


def test_parquet_input(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = str(tmp_path / "d.parquet")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "one", "completion": "two"}, {"prompt": "three", "completion": ""}]),
        p,
    )
    examples, report = load_dataset([p], tiny_tokenizer, settings("prompt_completion", 64))
    assert len(examples) == 1 and report.examples["empty_response"] == [f"{p}:2: empty response"]
