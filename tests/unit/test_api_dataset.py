"""spec.dataset: the sources form next to the single-source form, per-source rules, and the one place that
lists (and maps) every data file a spec reads."""

from __future__ import annotations

import pytest

from sftjob_api import SpecError, parse_spec
from sftjob_api.dataset import DatasetSpec


def _spec(dataset):
    return parse_spec({"model": {"uri": "m"}, "dataset": dataset, "output": {"uri": "s3://bucket/p"}})


def test_weight_and_samples_on_one_source_is_refused_naming_the_field():
    with pytest.raises(SpecError) as exc:
        _spec({"sources": [{"name": "a", "files": ["/d/a.jsonl"], "weight": 1.0, "samples": 5}]})
    assert any(
        e.startswith("spec.dataset.sources.0.samples: set either weight or samples") for e in exc.value.errors
    )


def test_perplexity_needs_exactly_one_cut():
    with pytest.raises(SpecError) as exc:
        _spec({"train": ["/d/t.jsonl"], "curation": {"perplexity": {}}})
    assert exc.value.errors == [
        "spec.dataset.curation.perplexity.percentile: set exactly one of maxPerplexity or percentile"
    ]


def test_neither_train_nor_sources_is_refused():
    with pytest.raises(SpecError) as exc:
        _spec({"format": "alpaca"})
    assert exc.value.errors == ["spec.dataset.sources: set exactly one of train or sources"]


def test_sources_inherit_format_and_mapping_and_single_form_is_one_source():
    ds = DatasetSpec.model_validate(
        {
            "format": "messages",
            "fieldMapping": {"messages": "conv"},
            "sources": [
                {"name": "a", "files": ["/d/a.jsonl"], "weight": 0.25},
                {"name": "b", "files": ["s3://bkt/b.jsonl"], "weight": 0.75, "format": "alpaca"},
            ],
            "eval": ["/d/e.jsonl"],
        }
    )
    a, b = ds.resolved_sources()
    assert (a.format, a.field_mapping.messages, b.format) == ("messages", "conv", "alpaca")
    single = DatasetSpec.model_validate({"train": ["/d/t.jsonl"], "format": "prompt_completion"})
    [s] = single.resolved_sources()
    assert (s.name, s.files, s.format, s.weight) == ("train", ["/d/t.jsonl"], "prompt_completion", None)
    assert ds.input_uris() == [
        ("sources.0.files.0", "/d/a.jsonl"),
        ("sources.1.files.0", "s3://bkt/b.jsonl"),
        ("eval.0", "/d/e.jsonl"),
    ]
    mapped = ds.with_uris(lambda u: u.upper())
    assert [u for _, u in mapped.input_uris()] == ["/D/A.JSONL", "S3://BKT/B.JSONL", "/D/E.JSONL"]
