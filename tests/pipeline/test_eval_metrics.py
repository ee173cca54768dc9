"""Pure metric functions: hand-computed values."""

from __future__ import annotations

import math

import pytest

from sftjob_api.evaluation import EvalGates, EvalMetrics
from sftjob_trainer.eval_metrics import (
    exact_match,
    generation_scores,
    lcs_length,
    loss_summary,
    normalize,
    rouge_l,
)


def test_normalize_drops_case_punctuation_and_spacing():
    assert normalize('{"Last_Name":  "Kim",\n "age": 67}') == "last name kim age 67"
    assert (
        normalize("  \uff28\uff45\uff4c\uff4c\uff4f,   World! ") == "hello world"
    )  # NFKC folds full-width letters


def test_exact_match_is_normalised_but_not_lenient():
    assert exact_match('{"a": 1}', "{ 'A' : 1 }") == 1.0
    assert exact_match("Kim Greta", "Greta Kim") == 0.0
    assert exact_match("", "") == 1.0


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "e", "d"]) == 3
    # prediction 4 tokens, reference 5 tokens, LCS 3: P = 3/4, R = 3/5, F1 = 2PR/(P+R) = 2/3
    assert rouge_l("the cat sat down", "the black cat lay down") == pytest.approx(2 / 3)
    assert rouge_l("x", "y") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("same words", "Same, words!") == 1.0


def test_generation_scores_average_over_samples():
    s = generation_scores(["a b", "c", "q"], ["a b", "c d", "z"])
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["rouge_l"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_loss_summary_perplexity_is_exp_of_mean():
    r = loss_summary(6.0, 4)
    assert r["eval_loss"] == 1.5 and r["perplexity"] == pytest.approx(math.exp(1.5)) and r["eval_tokens"] == 4
    assert loss_summary(0.0, 0)["eval_loss"] is None


def test_gates():
    res = EvalMetrics(eval_loss=1.2, perplexity=3.3, rouge_l=0.5, exact_match=0.25)
    assert EvalGates(max_eval_loss=1.5, min_rouge_l=0.5).failures(res) == []
    failed = EvalGates(max_eval_loss=1.0, min_exact_match=0.3, max_perplexity=4.0).failures(res)
    assert failed == ["maxEvalLoss: 1.2 > 1", "minExactMatch: 0.25 < 0.3"]
    assert EvalGates(min_rouge_l=0.1).failures(EvalMetrics(eval_loss=1.0)) == [
        "minRougeL: rougeL was not computed"
    ]
