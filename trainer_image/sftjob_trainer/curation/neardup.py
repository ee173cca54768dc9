"""Near-duplicate clusters: MinHash LSH (datasketch) proposes candidates, exact Jaccard on the word-shingle
sets confirms them, so the threshold is exact (LSH can only miss pairs, never invent them). The LSH bands are
tuned for recall (at threshold - 0.1, false negatives weighted 0.9): with 128 permutations a pair at the 0.9
threshold is proposed with probability 0.999 (datasketch's default tuning: 0.31), the extra candidates cost
one exact Jaccard each."""

from __future__ import annotations

from dataclasses import dataclass, field

from .text import ngrams, words

MINHASH_SEED = 1  # fixed: the same rows give the same signatures on every rank and every run
LSH_MARGIN = 0.1
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative) weights of datasketch's band optimisation


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class Cluster:
    keep: int  # index of the row kept (the first one seen)
    removed: list[tuple[int, float]] = field(default_factory=list)  # (index, Jaccard with the kept row)


def near_duplicates(texts: list[str | None], threshold: float, shingle: int, num_perm: int) -> list[Cluster]:
    """Clusters of rows whose shingle sets have Jaccard >= threshold with an earlier kept row, in input order.
    Rows given as None are not considered. Every row is compared against kept rows only."""
    from datasketch import MinHash, MinHashLSH  # here: it loads scipy (~0.7 s), which only curation needs

    lsh = MinHashLSH(threshold=max(0.3, threshold - LSH_MARGIN), num_perm=num_perm, weights=LSH_WEIGHTS)
    shingles: dict[int, set[str]] = {}
    clusters: dict[int, Cluster] = {}
    for i, text in enumerate(texts):
        if text is None:
            continue
        sh = ngrams(words(text), shingle)
        if not sh:
            continue
        mh = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
        mh.update_batch([s.encode() for s in sorted(sh)])
        best: tuple[float, int] | None = None
        for j in lsh.query(mh):
            sim = jaccard(sh, shingles[j])
            if sim >= threshold and (best is None or (sim, -j) > (best[0], -best[1])):
                best = (sim, j)
        if best is not None:
            clusters.setdefault(best[1], Cluster(best[1])).removed.append((i, best[0]))
            continue
        shingles[i] = sh
        lsh.insert(i, mh)
    return [clusters[k] for k in sorted(clusters)]
