"""Sources -> curated, mixed training examples plus the data report (torch-free; the perplexity scorer is
passed in). Order: read each source, exact duplicates, near-duplicates, eval decontamination, format +
tokenize + length filters, held-out split, perplexity filter, data gates, mixture. Every step is seeded or
order-preserving, so every rank, restart and stage computes the same data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sftjob_api.dataset import DatasetSpec
from sftjob_api.exit_codes import PermanentError
from sftjob_api.spec import OutputSpec

from ..data import IGNORE, Example, build_examples, split
from ..records import DropReport, Row, iter_rows
from .decontam import EvalIndex
from .mixing import Share, choose, mixture_counts
from .neardup import near_duplicates
from .report import (
    MAX_EXAMPLES,
    DataReport,
    SourceReport,
    check_contamination_gate,
    check_drop_gate,
    content_hash,
)
from .text import Content, content_of, snippet

Scorer = Callable[[list[Example]], list[float]]  # perplexity of each example's answer tokens


def _read(
    name: str | None, files: list[str], drops: DropReport, cache_dir: str | None, output: OutputSpec | None
) -> list[Row]:
    try:
        return list(iter_rows(files, drops, cache_dir, output))
    except PermanentError as e:
        raise PermanentError(f"source {name!r}: {e}" if name else str(e)) from e


def _tokenize(
    rows: list[Row], tok: Any, fmt: str, fields: Any, drops: DropReport, ds: DatasetSpec, dedup: bool
) -> list[Example]:
    return build_examples(
        rows,
        tok,
        fmt,
        drops,
        max_seq_len=ds.max_seq_length,
        fields=fields,
        min_tokens=ds.filter.min_tokens,
        max_tokens=ds.filter.max_tokens,
        dedup=dedup,
    )


def curate(
    ds: DatasetSpec,
    tok: Any,
    *,
    seed: int,
    cache_dir: str | None = None,
    output: OutputSpec | None = None,
    scorer: Scorer | None = None,
) -> tuple[list[Example], list[Example], DataReport]:
    """(train, eval, report). Raises PermanentError naming the source, file and line, or the failed gate."""
    cur = ds.curation
    rep = DataReport()
    srcs = ds.resolved_sources()
    rows: list[list[Row]] = []
    contents: list[list[Content | None]] = []
    for s in srcs:
        sr = SourceReport(s.name, list(s.files), s.weight, s.samples)
        rep.sources.append(sr)
        rows.append(_read(s.name if ds.sources else None, list(s.files), sr.drops, cache_dir, output))
        contents.append(
            [content_of(r.data, s.format or ds.format, s.field_mapping or ds.field_mapping) for r in rows[-1]]
        )
    alive = [[True] * len(r) for r in rows]

    def drop(si: int, ri: int, reason: str, detail: str = "") -> None:
        alive[si][ri] = False
        rep.sources[si].drops.drop(reason, rows[si][ri].where, detail)

    if ds.filter.dedup:  # exact duplicates on the row's turns, across sources (first seen is kept)
        seen: dict[tuple[tuple[str, str], ...], str] = {}
        for si, cs in enumerate(contents):
            for ri, c in enumerate(cs):
                if c is None:
                    continue
                if c.key in seen:
                    drop(si, ri, "duplicate", f"same as {seen[c.key]}")
                else:
                    seen[c.key] = rows[si][ri].where

    flat = [(si, ri) for si in range(len(rows)) for ri in range(len(rows[si]))]
    where = {(si, ri): f"{srcs[si].name}: {rows[si][ri].where}" for si, ri in flat}
    if cur is not None and cur.near_duplicates is not None:
        nd = cur.near_duplicates
        texts = [
            contents[si][ri].text if alive[si][ri] and contents[si][ri] else None  # type: ignore[union-attr]
            for si, ri in flat
        ]
        clusters = near_duplicates(texts, nd.threshold, nd.shingle_size, nd.num_perm)
        for cl in clusters:
            for i, sim in cl.removed:
                drop(*flat[i], "near_duplicate", f"Jaccard {sim:.2f} with {where[flat[cl.keep]]}")
        rep.near_duplicates = {
            "threshold": nd.threshold,
            "clusters": len(clusters),
            "rows_removed": sum(len(c.removed) for c in clusters),
            "examples": [
                {
                    "kept": where[flat[c.keep]],
                    "removed": [
                        {"row": where[flat[i]], "jaccard": round(j, 4)} for i, j in c.removed[:MAX_EXAMPLES]
                    ],
                    "size": 1 + len(c.removed),
                }
                for c in clusters[:MAX_EXAMPLES]
            ],
        }

    eval_rows: list[Row] = []
    eval_drops = DropReport()
    if ds.eval:
        eval_rows = _read("eval", list(ds.eval), eval_drops, cache_dir, output)
    if cur is not None and cur.decontamination is not None:
        dc = cur.decontamination
        index = EvalIndex(
            [
                (c, r.where)
                for r in eval_rows
                if (c := content_of(r.data, ds.format, ds.field_mapping)) is not None
            ],
            dc.ngram,
        )
        leaked: set[int] = set()
        hits: list[dict[str, Any]] = []
        for si, ri in flat:
            c = contents[si][ri]
            if not alive[si][ri] or c is None:
                continue
            hit = index.best_hit(c.text)
            if hit is None or hit.overlap < dc.threshold:
                continue
            leaked.add(hit.eval.row)
            drop(si, ri, "contaminated", f"{hit.overlap:.0%} of eval {hit.eval.part} {hit.eval.where}")
            if len(hits) < MAX_EXAMPLES:
                hits.append(
                    {
                        "train": where[(si, ri)],
                        "eval": hit.eval.where,
                        "part": hit.eval.part,
                        "overlap": round(hit.overlap, 4),
                        "train_text": snippet(c.text),
                    }
                )
        rep.contamination = {
            "ngram": dc.ngram,
            "threshold": dc.threshold,
            "eval_rows": len(eval_rows),
            "eval_rows_checked": index.checked_rows,
            "eval_rows_leaked": len(leaked),
            "train_rows_removed": sum(s.drops.dropped["contaminated"] for s in rep.sources),
            "examples": hits,
        }
        check_contamination_gate(
            cur, len(leaked), index.checked_rows, [f"{h['train']} contains eval {h['eval']}" for h in hits]
        )

    per_source: list[list[Example]] = []
    for si, s in enumerate(srcs):
        keep = [r for ri, r in enumerate(rows[si]) if alive[si][ri]]
        sr = rep.sources[si]
        per_source.append(_tokenize(keep, tok, s.format or ds.format, s.field_mapping, sr.drops, ds, False))

    if ds.eval:
        eval_examples = _tokenize(
            eval_rows, tok, ds.format, ds.field_mapping, eval_drops, ds, ds.filter.dedup
        )
        if not eval_examples:
            raise PermanentError(f"no usable eval rows in {', '.join(ds.eval)}: {eval_drops.summary()}")
    else:  # held out from all curated rows, before perplexity and mixing (the eval stage redoes exactly this)
        everything = [e for exs in per_source for e in exs]
        _, eval_examples = split(everything, ds.eval_split, seed)
        held = {id(e) for e in eval_examples}
        per_source = [[e for e in exs if id(e) not in held] for exs in per_source]

    if cur is not None and cur.perplexity is not None:
        rep.perplexity = _perplexity_filter(per_source, rep, tok, cur.perplexity, scorer)

    for exs, sr, s in zip(per_source, rep.sources, srcs, strict=True):
        sr.curated_rows = len(exs)
        if not exs:
            what, files = f"source {s.name!r}: " if ds.sources else "", ", ".join(s.files)
            if sr.drops.total_rows == 0:  # the same words as data.load_dataset
                raise PermanentError(f"{what}no training rows in {files}: empty (no non-blank line)")
            raise PermanentError(f"{what}no usable training rows in {files}: {sr.drops.summary()}")
    check_drop_gate(cur, rep)

    counts = mixture_counts(
        [Share(s.weight, s.samples, len(e)) for s, e in zip(srcs, per_source, strict=True)]
    )
    train: list[Example] = []
    for exs, sr, n in zip(per_source, rep.sources, counts, strict=True):
        picked = [exs[i] for i in choose(len(exs), n, seed, sr.name)]
        sr.mixed_rows = len(picked)
        sr.tokens = sum(len(e.input_ids) for e in picked)
        train += picked
    rep.train_examples, rep.eval_examples = len(train), len(eval_examples)
    rep.train_tokens = sum(len(e.input_ids) for e in train)
    rep.eval_tokens = sum(len(e.input_ids) for e in eval_examples)
    rep.content_hash = content_hash(train, eval_examples)
    return train, eval_examples, rep


def _perplexity_filter(
    per_source: list[list[Example]], rep: DataReport, tok: Any, spec: Any, scorer: Scorer | None
) -> dict[str, Any]:
    flat = [e for exs in per_source for e in exs]
    if scorer is None or not flat:
        return {"skipped": "no scorer in this stage" if scorer is None else "no rows"}
    scores = scorer(flat)
    cut = (
        spec.max_perplexity
        if spec.max_perplexity is not None
        else float(np.percentile(scores, spec.percentile))
    )
    it = iter(scores)
    dropped = 0
    for si, exs in enumerate(per_source):
        kept = []
        for e in exs:
            ppl = next(it)
            if ppl > cut:
                dropped += 1
                answer = tok.decode(
                    [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE]
                )
                rep.sources[si].drops.drop(
                    "perplexity", f"perplexity {ppl:.1f} > {cut:.1f}", snippet(answer, 80)
                )
            else:
                kept.append(e)
        per_source[si] = kept
    return {
        "threshold": round(cut, 4),
        "scored": len(scores),
        "dropped": dropped,
        "median": round(float(np.median(scores)), 4),
        "max": round(max(scores), 4),
    }
