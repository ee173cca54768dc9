"""Text metrics for the eval stage, as pure functions (no dependency beyond the standard library).

normalize(): Unicode NFKC, lower case, every punctuation/symbol character replaced by a space, whitespace
collapsed. Exact match compares normalized strings; ROUGE-L is the F1 of the longest common subsequence of
normalized whitespace tokens (Lin, 2004; beta = 1, i.e. the F-measure most toolkits report as rougeL).
The gates on these metrics are `sftjob_api.evaluation.EvalGates.failures`.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    out = [" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in text]
    return " ".join("".join(out).split())


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalized tokens; 1.0 when both are empty, 0.0 when exactly one is."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def loss_summary(loss_sum: float, n_tokens: int) -> dict[str, float | int | None]:
    """Mean token cross-entropy and perplexity from a sum over tokens (the trainer's loss convention)."""
    if n_tokens == 0:
        return {"eval_loss": None, "perplexity": None, "eval_tokens": 0}
    loss = loss_sum / n_tokens
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": n_tokens}


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    return {
        "exact_match": mean([exact_match(p, r) for p, r in zip(predictions, references, strict=True)]),
        "rouge_l": mean([rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]),
    }
