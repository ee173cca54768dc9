"""Curated data computed once (sftjob_trainer/curation/cache.py, pipeline.ensure_curated): the key follows
every input, an entry round-trips exactly, a half-written or corrupt entry is never used, and a second
preparation of the same inputs reads the entry instead of curating. Real files, the real (tiny) tokenizer."""

from __future__ import annotations

import os
from typing import Any

import pytest

from sftjob_api.layout import curated_root
from sftjob_api.storage import open_store
from sftjob_trainer.config import parse_config
from sftjob_trainer.curation import cache
from sftjob_trainer.pipeline import ensure_curated, prepare_eval

from .tiny import dataset_rows, write_jsonl

pytestmark = pytest.mark.trainer


def config(tmp_path: Any, model_dir: str, name: str = "a", **dataset: Any) -> Any:
    out = str(tmp_path / "out")
    data = {"train": [str(tmp_path / "train.jsonl")], "format": "alpaca", "maxSeqLength": 256, **dataset}
    return parse_config(
        {
            "run": {"namespace": "ns", "name": name, "outputRoot": f"{out}/ns/{name}"},
            "model": {"uri": model_dir},
            "dataset": data,
            "method": {"type": "lora"},
            "output": {"uri": out},
            "runtime": {"metricsPort": 0, "workDir": str(tmp_path / "work")},
        }
    )


@pytest.fixture
def data_file(tmp_path: Any) -> str:
    return write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(60, seed=3))


def key(cfg: Any, tok: Any, seed: int | None = None) -> str | None:
    return cache.key_for(cfg.dataset, tok, seed or cfg.training.seed, None, cfg.output)


def test_key_follows_the_data_the_spec_the_seed_and_the_tokenizer(
    tmp_path, data_file, tiny_model_dir, tiny_tokenizer
):
    cfg = config(tmp_path, tiny_model_dir)
    k = key(cfg, tiny_tokenizer)
    assert k is not None and k == key(
        config(tmp_path, tiny_model_dir, name="b"), tiny_tokenizer
    )  # run name: no
    assert key(config(tmp_path, tiny_model_dir, maxSeqLength=128), tiny_tokenizer) != k
    assert key(cfg, tiny_tokenizer, seed=cfg.training.seed + 1) != k
    other = cache.curation_key(
        cfg.dataset, {data_file: "sha256 0"}, cache.tokenizer_fingerprint(tiny_tokenizer), 42, None
    )
    assert other != cache.curation_key(
        cfg.dataset, {data_file: "sha256 1"}, cache.tokenizer_fingerprint(tiny_tokenizer), 42, None
    )
    assert cache.curation_key(cfg.dataset, {}, "tok-a", 42, None) != cache.curation_key(
        cfg.dataset, {}, "tok-b", 42, None
    )
    with open(data_file, "a") as f:  # one more row: new content, new key
        f.write('{"instruction": "x", "output": "y"}\n')
    assert key(cfg, tiny_tokenizer) != k
    os.remove(data_file)  # unreadable input: no key (curation itself names the missing file)
    assert key(cfg, tiny_tokenizer) is None


def test_second_preparation_reads_what_the_first_saved(tmp_path, data_file, tiny_model_dir, tiny_tokenizer):
    cfg = config(tmp_path, tiny_model_dir)
    first = ensure_curated(cfg, tiny_tokenizer)
    assert not first.reused and first.key and first.train and first.eval
    root = curated_root(cfg.output.uri, "ns")
    assert sorted(open_store(root).list(first.key)) == [
        f"{first.key}/{n}" for n in ("COMPLETE", "eval.npz", "report.json", "train.npz")
    ]
    again = ensure_curated(config(tmp_path, tiny_model_dir, name="rerun"), tiny_tokenizer)
    assert again.reused and again.key == first.key  # another run: read, not curated
    assert (again.train, again.eval, again.report) == (first.train, first.eval, first.report)
    assert not ensure_curated(cfg, tiny_tokenizer).reused  # the run that curated it reads its own data
    held_out = prepare_eval(config(tmp_path, tiny_model_dir, name="rerun"), tiny_tokenizer)
    # the eval stage reads eval.npz only
    assert held_out.reused and held_out.eval == first.eval and held_out.train == []


def test_incomplete_or_corrupt_entry_is_curated_again(tmp_path, data_file, tiny_model_dir, tiny_tokenizer):
    cfg = config(tmp_path, tiny_model_dir)
    first = ensure_curated(cfg, tiny_tokenizer)
    store = open_store(curated_root(cfg.output.uri, "ns"))
    store.delete(f"{first.key}/{cache.COMPLETE}")  # an upload cut before its marker
    assert cache.load(store, first.key) is None
    assert prepare_eval(cfg, tiny_tokenizer).eval == first.eval  # curated again, not saved
    assert cache.load(store, first.key) is None
    ensure_curated(cfg, tiny_tokenizer)
    assert cache.load(store, first.key) is not None
    store.put_bytes(b"not an npz", f"{first.key}/{cache.part_file('train')}")
    assert cache.load(store, first.key) is None
    second = ensure_curated(config(tmp_path, tiny_model_dir, name="b"), tiny_tokenizer)
    assert not second.reused and second.train == first.train
    assert ensure_curated(config(tmp_path, tiny_model_dir, name="c"), tiny_tokenizer).reused  # repaired


def test_examples_round_trip_exactly(tmp_path, data_file, tiny_model_dir, tiny_tokenizer):
    cfg = config(tmp_path, tiny_model_dir, evalSplit=0.2)
    p = prepare_eval(cfg, tiny_tokenizer)
    store = open_store(str(tmp_path / "c"))
    assert cache.save(store, "k", cache.Curated(p.train, p.eval, p.report, "ns/a"))
    got = cache.load(store, "k")
    assert got is not None
    assert (got.train, got.eval, got.report, got.curated_by) == (p.train, p.eval, p.report, "ns/a")
    assert any(x == -100 for e in got.train for x in e.labels)  # masked prompt tokens survive
