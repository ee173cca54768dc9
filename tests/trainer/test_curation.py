"""Data curation (sftjob_trainer.curation): weighted mixtures, near-duplicates, eval decontamination, data
gates, per-source errors and the content hash. Real files, the real (tiny) tokenizer, no mocks; the
perplexity filter with the real SmolLM2 is in test_curation_perplexity.py."""

from __future__ import annotations

import json
import random

import pytest

from sftjob_api import Layout
from sftjob_api.dataset import DatasetSpec
from sftjob_api.exit_codes import PermanentError
from sftjob_api.manifest import build_manifest
from sftjob_api.storage import open_store
from sftjob_operator.local.report import data_lines
from sftjob_trainer.curation import curate
from sftjob_trainer.curation.neardup import jaccard
from sftjob_trainer.curation.text import ngrams, words

from .tiny import write_jsonl

pytestmark = pytest.mark.trainer

VOCAB = [f"w{i}" for i in range(400)]
MIX_TOLERANCE = 0.01  # |source fraction - weight| after mixing (rounding to whole rows only)


def pc_rows(n: int, tag: str, seed: int, length: int = 12) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"{tag} {i} " + " ".join(rng.choices(VOCAB, k=length)),
            "completion": " ".join(rng.choices(VOCAB, k=4)),
        }
        for i in range(n)
    ]


def spec(**kw) -> DatasetSpec:
    base = {"format": "prompt_completion", "maxSeqLength": 512}
    return DatasetSpec.model_validate({**base, **kw})


def run(ds: DatasetSpec, tok, seed: int = 7):
    return curate(ds, tok, seed=seed)


def test_mixture_proportions_follow_the_weights(tiny_tokenizer, tmp_path):
    files = {
        name: write_jsonl(str(tmp_path / f"{name}.jsonl"), pc_rows(n, name, i))
        for i, (name, n) in enumerate((("general", 400), ("domain", 300), ("hard", 100)))
    }
    weights = {"general": 0.5, "domain": 0.3, "hard": 0.2}
    ds = spec(
        sources=[{"name": k, "files": [files[k]], "weight": w} for k, w in weights.items()],
        evalSplit=0.05,
    )
    train, ev, rep = run(ds, tiny_tokenizer)
    d = rep.as_dict()
    assert len(ev) > 0 and d["train_examples"] == len(train)
    for name, w in weights.items():
        assert abs(d["mixture"][name] - w) <= MIX_TOLERANCE, d["mixture"]
        assert d["sources"][name]["mixed_rows"] <= d["sources"][name]["curated_rows"]  # never repeated
    # the scarcest source (hard: 100 rows, minus its held-out share, for 20%) is used completely
    assert d["sources"]["hard"]["mixed_rows"] == d["sources"]["hard"]["curated_rows"]
    # the same seed draws the same rows; another seed other rows
    train2, _, _ = run(ds, tiny_tokenizer)
    assert [e.input_ids for e in train2] == [e.input_ids for e in train]
    assert rep.content_hash == run(ds, tiny_tokenizer)[2].content_hash


def test_fixed_sample_counts_repeat_a_small_source(tiny_tokenizer, tmp_path):
    a = write_jsonl(str(tmp_path / "a.jsonl"), pc_rows(30, "a", 1))
    b = write_jsonl(str(tmp_path / "b.jsonl"), pc_rows(10, "b", 2))
    e = write_jsonl(str(tmp_path / "e.jsonl"), pc_rows(5, "e", 3))
    ds = spec(
        sources=[{"name": "a", "files": [a], "samples": 12}, {"name": "b", "files": [b], "samples": 25}],
        eval=[e],
    )
    train, _, rep = run(ds, tiny_tokenizer)
    d = rep.as_dict()["sources"]
    assert (d["a"]["mixed_rows"], d["b"]["mixed_rows"]) == (12, 25) and len(train) == 37
    # b's 10 rows: two whole passes plus 5 distinct rows
    b_ids = [tuple(x.input_ids) for x in train[12:]]
    assert len(set(b_ids)) == 10 and max(b_ids.count(t) for t in b_ids) == 3


def _edit(ws: list[str], positions: list[int], rng: random.Random) -> list[str]:
    out = list(ws)
    for p in positions:
        out[p] = rng.choice([v for v in VOCAB if v != out[p]]) + "x"
    return out


def test_near_duplicates_above_threshold_removed_below_kept(tiny_tokenizer, tmp_path):
    rng = random.Random(5)
    rows, near, far = [], [], []
    for _ in range(12):
        base = rng.choices(VOCAB, k=200)
        rows.append({"prompt": " ".join(base), "completion": "ok"})
        # one edited word: 5 of ~196 shingles change (Jaccard ~0.95); four spread edits: ~0.81
        one = _edit(base, [100], rng)
        four = _edit(base, [20, 60, 120, 170], rng)
        for variant, bucket in ((one, near), (four, far)):
            j = jaccard(ngrams(words(" ".join(base) + " ok"), 5), ngrams(words(" ".join(variant) + " ok"), 5))
            assert (j >= 0.93) if bucket is near else (j <= 0.87), j  # clear of the 0.9 threshold
            rows.append({"prompt": " ".join(variant), "completion": "ok"})
            bucket.append(len(rows))  # 1-based line number
    f = write_jsonl(str(tmp_path / "t.jsonl"), rows)
    ev = write_jsonl(str(tmp_path / "e.jsonl"), pc_rows(3, "e", 9))
    ds = spec(train=[f], eval=[ev], curation={"nearDuplicates": {"threshold": 0.9}})
    train, _, rep = run(ds, tiny_tokenizer)
    d = rep.as_dict()
    removed = {r["row"] for c in rep.near_duplicates["examples"] for r in c["removed"]}
    assert d["dropped"]["near_duplicate"] == len(near) == 12
    assert rep.near_duplicates["clusters"] == 12
    assert len(train) == len(rows) - len(near)
    assert all(f"train: {f}:{n}" in removed for n in near[:5])
    assert not any(f"{f}:{n}" in r for n in far for r in removed)


def test_below_threshold_pairs_kept_at_a_lower_threshold_too(tiny_tokenizer, tmp_path):
    """The same ~0.81 pairs are removed once the threshold is below them (the threshold is what decides)."""
    rng = random.Random(6)
    rows = []
    for _ in range(6):
        base = rng.choices(VOCAB, k=200)
        rows += [
            {"prompt": " ".join(base), "completion": "ok"},
            {"prompt": " ".join(_edit(base, [20, 60, 120, 170], rng)), "completion": "ok"},
        ]
    f = write_jsonl(str(tmp_path / "t.jsonl"), rows)
    ev = write_jsonl(str(tmp_path / "e.jsonl"), pc_rows(3, "e", 9))
    ds = spec(train=[f], eval=[ev], curation={"nearDuplicates": {"threshold": 0.7}})
    _, _, rep = run(ds, tiny_tokenizer)
    assert rep.dropped["near_duplicate"] == 6


def _eval_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    return [
        {
            "prompt": "question " + " ".join(rng.choices(VOCAB, k=14)),
            "completion": "answer " + " ".join(rng.choices(VOCAB, k=12)),
        }
        for _ in range(n)
    ]


def test_every_planted_eval_leak_is_removed(tiny_tokenizer, tmp_path):
    rng = random.Random(11)
    evals = _eval_rows(20, rng)
    clean = pc_rows(60, "clean", 12, length=20)
    leaks = [
        {"prompt": evals[0]["prompt"], "completion": "some other answer"},  # the eval prompt verbatim
        {
            "prompt": "tell me",
            "completion": "Sure. " + evals[1]["completion"] + " Hope that helps.",
        },  # answer inside
        {"prompt": evals[2]["prompt"].upper().replace(" ", ", "), "completion": "x"},  # case and punctuation
        {"prompt": "intro words here " + evals[3]["prompt"], "completion": evals[3]["completion"]},
        {
            "prompt": " ".join(evals[4]["prompt"].split()[:13]) + " and more",
            "completion": "y",
        },  # 13 of its 15 words: 6 of its 8 8-grams
    ]
    rows = clean[:30] + leaks + clean[30:]
    f = write_jsonl(str(tmp_path / "t.jsonl"), rows)
    e = write_jsonl(str(tmp_path / "e.jsonl"), evals)
    ds = spec(train=[f], eval=[e], curation={"decontamination": {"ngram": 8, "threshold": 0.5}})
    train, ev, rep = run(ds, tiny_tokenizer)
    c = rep.contamination
    assert rep.dropped["contaminated"] == len(leaks) and len(train) == len(clean) and len(ev) == len(evals)
    assert c["eval_rows_leaked"] == 5 and c["eval_rows_checked"] == 20
    assert {h["train"] for h in c["examples"]} == {f"train: {f}:{n}" for n in range(31, 36)}
    assert c["examples"][0]["eval"] == f"{e}:1"


def test_contamination_gate_fails_with_its_reason(tiny_tokenizer, tmp_path):
    rng = random.Random(13)
    evals = _eval_rows(10, rng)
    rows = pc_rows(20, "clean", 14) + [{"prompt": x["prompt"], "completion": "z"} for x in evals[:3]]
    ds = spec(
        train=[write_jsonl(str(tmp_path / "t.jsonl"), rows)],
        eval=[write_jsonl(str(tmp_path / "e.jsonl"), evals)],
        curation={"decontamination": {}, "maxContamination": 0.2},
    )
    with pytest.raises(PermanentError, match=r"data gate maxContamination: 3/10 eval rows \(30\.0%\)"):
        run(ds, tiny_tokenizer)


def test_drop_fraction_gate_fails_with_its_reason(tiny_tokenizer, tmp_path):
    f = tmp_path / "t.jsonl"
    write_jsonl(str(f), pc_rows(6, "ok", 1))
    with open(f, "a") as out:
        out.write("{not json\n" * 4)
    ds = spec(train=[str(f)], curation={"maxDropFraction": 0.3})
    with pytest.raises(
        PermanentError, match=r"data gate maxDropFraction: 4/10 rows \(40\.0%\).*malformed_json=4"
    ):
        run(ds, tiny_tokenizer)
    ok = spec(train=[str(f)], curation={"maxDropFraction": 0.5})
    assert len(run(ok, tiny_tokenizer)[0]) + len(run(ok, tiny_tokenizer)[1]) == 6


def test_a_failing_source_names_source_file_and_line(tiny_tokenizer, tmp_path):
    good = write_jsonl(str(tmp_path / "good.jsonl"), pc_rows(10, "g", 1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n{oops\n')
    ds = spec(sources=[{"name": "general", "files": [good]}, {"name": "domain", "files": [str(bad)]}])
    with pytest.raises(PermanentError) as ei:
        run(ds, tiny_tokenizer)
    msg = str(ei.value)
    assert msg.startswith("source 'domain': no usable training rows in " + str(bad)), msg
    assert f"{bad}:1: missing field 'completion'" in msg and f"{bad}:2:" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    ds = spec(sources=[{"name": "general", "files": [good]}, {"name": "hard", "files": [str(empty)]}])
    with pytest.raises(PermanentError, match=r"^source 'hard': no training rows in .*empty\.jsonl: empty"):
        run(ds, tiny_tokenizer)
    missing = spec(
        sources=[
            {"name": "general", "files": [good]},
            {"name": "hard", "files": [str(tmp_path / "nope.jsonl")]},
        ]
    )
    with pytest.raises(PermanentError, match=r"^source 'hard': dataset file not found: .*nope\.jsonl"):
        run(missing, tiny_tokenizer)


def test_identical_inputs_give_the_same_content_hash(tiny_tokenizer, tmp_path):
    rows = pc_rows(40, "h", 3)
    a = write_jsonl(str(tmp_path / "a.jsonl"), rows)
    b = write_jsonl(str(tmp_path / "b.jsonl"), rows)  # same content, another file
    cur = {"nearDuplicates": {}}
    h1 = run(spec(train=[a], curation=cur), tiny_tokenizer)[2].content_hash
    assert (
        h1.startswith("sha256:") and h1 == run(spec(train=[b], curation=cur), tiny_tokenizer)[2].content_hash
    )
    rows[5]["completion"] += " changed"
    c = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    assert run(spec(train=[c], curation=cur), tiny_tokenizer)[2].content_hash != h1
    assert run(spec(train=[a], curation=cur), tiny_tokenizer, seed=8)[2].content_hash != h1  # other split


def test_single_source_form_and_exact_duplicates_across_sources(tiny_tokenizer, tmp_path):
    rows = pc_rows(8, "d", 4)
    a = write_jsonl(str(tmp_path / "a.jsonl"), rows)
    b = write_jsonl(str(tmp_path / "b.jsonl"), rows[:3] + pc_rows(2, "other", 5))
    ev = write_jsonl(str(tmp_path / "e.jsonl"), pc_rows(2, "e", 6))
    _, _, rep = run(
        spec(sources=[{"name": "a", "files": [a]}, {"name": "b", "files": [b]}], eval=[ev]), tiny_tokenizer
    )
    d = rep.as_dict()
    assert d["sources"]["b"]["dropped"] == {"duplicate": 3} and d["sources"]["b"]["curated_rows"] == 2
    assert d["examples"]["duplicate"][0] == f"b: {b}:1: same as {a}:1"
    _, _, single = run(spec(train=[a], eval=[ev]), tiny_tokenizer)
    assert list(single.as_dict()["sources"]) == ["train"] and single.as_dict()["kept_rows"] == 8


def test_sftjob_run_summary_and_manifest_show_the_data_report(tiny_tokenizer, tmp_path):
    rng = random.Random(21)
    evals = _eval_rows(6, rng)
    a = write_jsonl(
        str(tmp_path / "a.jsonl"), [*pc_rows(40, "a", 1), {"prompt": evals[0]["prompt"], "completion": "q"}]
    )
    b = write_jsonl(str(tmp_path / "b.jsonl"), pc_rows(20, "b", 2))
    ds = spec(
        sources=[
            {"name": "general", "files": [a], "weight": 0.6},
            {"name": "hard", "files": [b], "weight": 0.4},
        ],
        eval=[write_jsonl(str(tmp_path / "e.jsonl"), evals)],
        curation={"nearDuplicates": {}, "decontamination": {}},
    )
    _, _, rep = run(ds, tiny_tokenizer)
    lines = data_lines(rep.as_dict())
    text = "\n".join(lines)
    assert lines[0].startswith(f"data: 60/61 rows kept, {rep.train_examples} training samples")
    assert "general" in text and "60.0%" in text and "40.0%" in text and "contaminated=1" in text
    assert "decontamination: 1/6 eval rows leaked, 1 training rows removed" in text
    store = open_store(str(tmp_path / "run"), None)
    store.put_bytes(json.dumps(rep.as_dict()).encode(), Layout.DATA_REPORT)
    doc = build_manifest(store, {}, {})
    assert doc["data"]["content_hash"] == rep.content_hash and doc["data"]["mixture"] == {
        "general": 0.6,
        "hard": 0.4,
    }
