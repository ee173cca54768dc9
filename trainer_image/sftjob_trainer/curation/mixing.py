"""How many samples each source contributes, and which (seeded, the same on every rank and restart).

Weights are fractions of the training *samples*: the mixture is as large as its scarcest source allows
(rows are never repeated), N = min(available_i / weight_i), and source i gives round(weight_i * N) rows
(largest remainders, never more than it has). Without weights a source gives `samples` rows (repeating
whole passes, then a seeded subset, when it has fewer) or all of its rows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Share:
    weight: float | None
    samples: int | None
    available: int


def mixture_counts(shares: list[Share]) -> list[int]:
    if shares and all(s.weight is not None for s in shares):
        total = min(s.available / (s.weight or 1) for s in shares)
        exact = [(s.weight or 0) * total for s in shares]
        counts = [min(s.available, math.floor(x + 1e-9)) for s, x in zip(shares, exact, strict=True)]
        order = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
        for i in order[: max(0, round(sum(exact)) - sum(counts))]:
            if counts[i] < shares[i].available:
                counts[i] += 1
        return counts
    return [s.available if s.samples is None else s.samples for s in shares]


def choose(available: int, count: int, seed: int, source: str) -> list[int]:
    """`count` indices into `available` rows: a seeded subset (ascending), or whole passes plus a subset."""
    rng = random.Random(f"{seed}:{source}")
    passes, rest = divmod(count, available) if available else (0, 0)
    out = list(range(available)) * passes
    return out + sorted(rng.sample(range(available), rest))
