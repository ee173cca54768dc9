"""examples/sftjob-curated-mixture.yaml: curation removes every planted near-duplicate and eval leak of the
example's three sources and mixes them 50/30/20 (real SmolLM2 tokenizer); end to end with `sftjob run`, the
curate stage runs first, training reads only its shard of the result, the summary and train/data_report.json say
what was removed and the manifest records the content hash (slow)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml

from sftjob_api import parse_sftjob
from sftjob_trainer.curation import curate

from .sftjob_cli import sftjob_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "sftjob-curated-mixture.yaml")
DATA = os.path.join(REPO, "examples", "data")

pytestmark = pytest.mark.trainer


def _planted() -> dict[str, dict[str, list[int]]]:
    spec = importlib.util.spec_from_file_location(
        "generate_mixture", os.path.join(DATA, "generate_mixture.py")
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0, "run: python examples/data/generate_mixture.py"
    return mod.planted()


def _example_dataset(weights: bool = True):
    with open(EXAMPLE) as f:
        job = parse_sftjob(yaml.safe_load(f), EXAMPLE)
    ds = job.spec.dataset.with_uris(lambda u: os.path.normpath(os.path.join(REPO, "examples", u)))
    if not weights:  # every curated row stays, so what survived is exactly what curation kept
        ds = ds.model_copy(
            update={"sources": [s.model_copy(update={"weight": None}) for s in ds.sources or []]}
        )
    return ds, job.spec.training.seed


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from sftjob_trainer.model_cache import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))


def test_example_curation_removes_every_planted_problem(tok):
    planted = _planted()
    ds, seed = _example_dataset(weights=False)
    train, ev, rep = curate(ds, tok, seed=seed)
    texts = [tok.decode(e.input_ids) for e in train]
    for name, marks in planted.items():
        with open(os.path.join(DATA, f"mixture-{name}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        for line in marks["leak"]:
            assert not any(rows[line - 1]["input"] in t for t in texts), (name, line)
        assert rep.as_dict()["sources"][name]["dropped"] == (
            {"near_duplicate": len(marks["near"])} if marks["near"] else {}
        ) | ({"contaminated": len(marks["leak"])} if marks["leak"] else {})
    assert rep.contamination["eval_rows_leaked"] == 9 and rep.near_duplicates["clusters"] == 18
    assert len(ev) == 48 and len(train) == rep.total_rows - 27


def test_example_mixture_follows_the_weights(tok):
    ds, seed = _example_dataset()
    _, _, rep = curate(ds, tok, seed=seed)
    assert rep.as_dict()["mixture"] == {"general": 0.5, "formal": 0.3, "hard": 0.2}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_example_runs_end_to_end_with_sftjob_run(tmp_path):
    proc = sftjob_run(EXAMPLE, tmp_path, output=tmp_path / "out", timeout=1700)
    root = tmp_path / "out" / "local" / "smollm2-curated-mixture"
    report = json.loads((root / "train" / "data_report.json").read_text())
    manifest = json.loads((root / "manifest.json").read_text())
    assert report["dropped"] == {"near_duplicate": 18, "contaminated": 9}
    assert manifest["data"]["content_hash"] == report["content_hash"]
    assert "decontamination: 9/48 eval rows leaked, 9 training rows removed" in proc.stdout
    assert "near-duplicates (Jaccard >= 0.9): 18 clusters, 18 rows removed" in proc.stdout
    # the curate stage did the work before training; training read its own shard and curated nothing
    assert proc.stdout.index("phase Curating") < proc.stdout.index("phase Training")

    def events(stage: str, name: str) -> list[dict]:
        lines = (tmp_path / "work" / f"{stage}.log").read_text().splitlines()
        return [e for x in lines if x.startswith("{") and (e := json.loads(x))["event"] == name]

    [curated] = events("curate", "curated")
    assert curated["content_hash"] == report["content_hash"] and not curated["reused"]
    assert curated["dropped"] == report["dropped"] and curated["world_size"] == 1
    assert not events("train", "curating")
    [fetched] = events("train", "data_fetched")
    assert fetched["keys"] == [f"{curated['curated_key']}/shards/{curated['shards']}/rank-0.npz"]
