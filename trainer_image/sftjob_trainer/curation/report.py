"""The data report (train/data_report.json): rows in/out per source and per reason, near-duplicate clusters,
contamination hits, perplexity cut, token counts, final mixture proportions, and the curated data's
content hash. The data gates read it."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sftjob_api.dataset import CurationSpec
from sftjob_api.exit_codes import PermanentError

from ..data import Example
from ..records import DropReport

MAX_EXAMPLES = 5


@dataclass
class SourceReport:
    name: str
    files: list[str]
    weight: float | None = None
    samples: int | None = None
    drops: DropReport = field(default_factory=DropReport)
    curated_rows: int = 0
    mixed_rows: int = 0
    tokens: int = 0

    def as_dict(self, total_mixed: int) -> dict[str, Any]:
        return {
            "files": self.files,
            "weight": self.weight,
            "samples": self.samples,
            "rows_in": self.drops.total_rows,
            "dropped": dict(self.drops.dropped),
            "examples": self.drops.examples,
            "curated_rows": self.curated_rows,
            "mixed_rows": self.mixed_rows,
            "tokens": self.tokens,
            "fraction": round(self.mixed_rows / total_mixed, 6) if total_mixed else 0.0,
        }


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    near_duplicates: dict[str, Any] | None = None
    contamination: dict[str, Any] | None = None
    perplexity: dict[str, Any] | None = None
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    eval_tokens: int = 0
    content_hash: str = ""

    @property
    def dropped(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for s in self.sources:
            out.update(s.drops.dropped)
        return out

    @property
    def total_rows(self) -> int:
        return sum(s.drops.total_rows for s in self.sources)

    def as_dict(self) -> dict[str, Any]:
        mixed = sum(s.mixed_rows for s in self.sources)
        examples: dict[str, list[str]] = {}
        for s in self.sources:
            for reason, ex in s.drops.examples.items():
                room = MAX_EXAMPLES - len(examples.setdefault(reason, []))
                examples[reason] += [f"{s.name}: {e}" for e in ex[: max(0, room)]]
        return {
            "total_rows": self.total_rows,
            "kept_rows": sum(s.curated_rows for s in self.sources),
            "dropped": dict(self.dropped),
            "examples": examples,
            "sources": {s.name: s.as_dict(mixed) for s in self.sources},
            "mixture": {s.name: round(s.mixed_rows / mixed, 6) if mixed else 0.0 for s in self.sources},
            "near_duplicates": self.near_duplicates,
            "contamination": self.contamination,
            "perplexity": self.perplexity,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "tokens": {"train": self.train_tokens, "eval": self.eval_tokens},
            "content_hash": self.content_hash,
        }

    def summary(self) -> str:
        parts = [f"{sum(s.curated_rows for s in self.sources)}/{self.total_rows} rows kept"]
        for reason, n in sorted(self.dropped.items()):
            ex = next((e for s in self.sources for e in s.drops.examples.get(reason, [])), "")
            parts.append(f"{reason}={n}" + (f" (e.g. {ex})" if ex else ""))
        return ", ".join(parts)


def content_hash(train: Iterable[Example], eval_: Iterable[Example]) -> str:
    """sha256 of the curated token ids and labels, train then eval: equal hashes, equal training data."""
    h = hashlib.sha256()
    for part, exs in ((b"train", train), (b"eval", eval_)):
        h.update(part)
        for e in exs:
            h.update(len(e.input_ids).to_bytes(4, "little"))
            h.update(b"".join(x.to_bytes(4, "little", signed=True) for x in e.input_ids))
            h.update(b"".join(x.to_bytes(4, "little", signed=True) for x in e.labels))
    return "sha256:" + h.hexdigest()


def check_contamination_gate(cur: CurationSpec | None, leaked: int, checked: int, hits: list[str]) -> None:
    if cur is None or cur.max_contamination is None or not checked:
        return
    frac = leaked / checked
    if frac > cur.max_contamination:
        raise PermanentError(
            f"data gate maxContamination: {leaked}/{checked} eval rows ({frac:.1%}) leaked into the training data"
            f" (> {cur.max_contamination:.1%}), e.g. {'; '.join(hits[:2])}"
        )


def check_drop_gate(cur: CurationSpec | None, report: DataReport | DropReport) -> None:
    """The SFT data report, or the align stage's preference rows (preference_data.py)."""
    if cur is None or cur.max_drop_fraction is None or not report.total_rows:
        return
    dropped = sum(report.dropped.values())
    frac = dropped / report.total_rows
    if frac > cur.max_drop_fraction:
        raise PermanentError(
            f"data gate maxDropFraction: {dropped}/{report.total_rows} rows ({frac:.1%}) dropped"
            f" (> {cur.max_drop_fraction:.1%}): {report.summary()}"
        )
