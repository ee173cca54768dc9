"""Eval-set decontamination: a training row is contaminated when it contains at least `threshold` of one
eval prompt's or answer's word n-grams. Eval texts shorter than n words are not checked (a one-word answer
such as "Paris" would flag every row that mentions Paris)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .text import Content, ngrams, words


@dataclass(frozen=True)
class EvalText:
    row: int  # index of the eval row
    part: str  # "prompt" or "answer"
    where: str  # file:line of the eval row
    n: int  # its number of distinct n-grams


@dataclass(frozen=True)
class Hit:
    eval: EvalText
    overlap: float  # fraction of the eval text's n-grams found in the training row


class EvalIndex:
    def __init__(self, eval_rows: list[tuple[Content, str]], n: int) -> None:
        self.n = n
        self.texts: list[EvalText] = []
        self.index: dict[str, list[int]] = {}
        for r, (c, where) in enumerate(eval_rows):
            for part, text in (("prompt", c.prompt), ("answer", c.answer)):
                ws = words(text)
                if len(ws) < n:
                    continue
                grams = ngrams(ws, n)
                tid = len(self.texts)
                self.texts.append(EvalText(r, part, where, len(grams)))
                for g in grams:
                    self.index.setdefault(g, []).append(tid)
        self.checked_rows = len({t.row for t in self.texts})

    def best_hit(self, text: str) -> Hit | None:
        counts: Counter[int] = Counter()
        for g in ngrams(words(text), self.n):
            counts.update(self.index.get(g, ()))
        best: Hit | None = None
        for tid, k in counts.items():
            t = self.texts[tid]
            h = Hit(t, k / t.n)
            if best is None or h.overlap > best.overlap:
                best = h
        return best
