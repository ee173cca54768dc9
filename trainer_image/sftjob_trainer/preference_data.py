"""Preference pairs for the align stage (spec.alignment.dataset, docs/alignment.md "Data"), torch-free.

rows -> validated (prompt, chosen, rejected) -> exact dedup -> token ids -> length rule -> held-out split ->
eval decontamination. The SFT data path does each step: files are read by records.iter_rows (JSONL / Parquet,
local or S3, malformed lines counted with file:line), a prompt and a response are formatted by
formatting.format_row and tokenized by data.tokenize_batch, so a pair's `prompt + chosen` is exactly the
sequence SFT would train on for that prompt and response, and `chosen` exactly its trained tokens.
Every unusable row is a drop with a reason and file:line; no usable pair is a PermanentError.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sftjob_api.alignment import PreferenceDataset, PreferenceFieldMapping
from sftjob_api.exit_codes import PermanentError
from sftjob_api.trainer_config import TrainerConfig

from .curation.decontam import EvalIndex
from .curation.report import MAX_EXAMPLES, check_contamination_gate, check_drop_gate
from .curation.text import Content, content_of, snippet
from .data import IGNORE, split, tokenize_batch
from .formatting import CONTENT, ROLE, Formatted, RowError, format_row
from .records import MAX_EXAMPLES_PER_REASON, DropReport, iter_rows

Turns = tuple[tuple[str, str], ...]  # (role, content)
BATCH = 256  # rows per tokenizer call (two texts each)


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[int]  # chat template applied as SFT does; left-truncated so prompt + longer response fit
    chosen: list[int]  # the response's tokens as SFT trains them (ends with EOS / end-of-turn)
    rejected: list[int]
    origin: str  # "file:line" (JSONL line, or Parquet row number + 1)


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    report: dict[str, Any]  # see _report; "dropped" feeds sft_data_rows_dropped_total{reason}


@dataclass(frozen=True)
class _Row:
    """A validated preference row before tokenization."""

    prompt: str | Turns
    chosen: str
    rejected: str
    where: str
    file: int  # index into _Files

    @property
    def key(self) -> tuple[str | Turns, str, str]:
        return self.prompt, self.chosen, self.rejected

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "\n".join(c for _, c in self.prompt)

    def formatted(self, response: str, tok: Any, templ: bool) -> Formatted:
        """The SFT formatting of this prompt followed by `response`, labelling only that response."""
        if isinstance(self.prompt, str):
            f = format_row(
                {"prompt": self.prompt, "completion": response}, "prompt_completion", tok, None, templ
            )
        else:
            turns = [{ROLE: r, CONTENT: c} for r, c in self.prompt]
            msgs = [*turns, {ROLE: "assistant", CONTENT: response}]
            f = format_row({"messages": msgs}, "messages", tok, None, templ)
        return Formatted(f.text, f.spans[-1:])  # earlier assistant turns belong to the prompt


_Pair = tuple[_Row, PreferencePair]


@dataclass
class _Files:
    """One DropReport per input file (iter_rows counts rows and bad lines into it) and its split."""

    uris: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    drops: list[DropReport] = field(default_factory=list)
    truncated_prompts: int = 0

    def add(self, uri: str, split: str) -> int:
        self.uris.append(uri)
        self.splits.append(split)
        self.drops.append(DropReport())
        return len(self.uris) - 1

    def drop(self, row: _Row, reason: str, detail: str) -> None:
        self.drops[row.file].drop(reason, row.where, detail)

    def merged(self, split: str | None = None) -> DropReport:
        out = DropReport()
        for s, d in zip(self.splits, self.drops, strict=True):
            if split is not None and s != split:
                continue
            out.total_rows += d.total_rows
            out.kept_rows += d.kept_rows
            out.dropped.update(d.dropped)
            for reason, ex in d.examples.items():
                have = out.examples.setdefault(reason, [])
                have += ex[: max(0, MAX_EXAMPLES_PER_REASON - len(have))]
        return out


# ---- one row: pure ----


def _get(data: Mapping[str, Any], name: str) -> Any:
    val = data.get(name)
    if val is None:
        raise RowError("missing_field", f"missing field {name!r}")
    return val


def _string(val: Any, name: str) -> str:
    if not isinstance(val, str):
        raise RowError("wrong_type", f"field {name!r} is {type(val).__name__}, not a string")
    return val


def _turns(val: Any, name: str) -> Turns:
    if not isinstance(val, list):
        raise RowError(
            "wrong_type", f"field {name!r} is {type(val).__name__}, not a list of {{role, content}}"
        )
    out = []
    for i, m in enumerate(val):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get(ROLE), str)
            or not isinstance(m.get(CONTENT), str)
        ):
            raise RowError("wrong_type", f"turn {i} of {name!r} lacks a string role/content")
        out.append((m[ROLE], m[CONTENT]))
    return tuple(out)


def parse_row(data: Mapping[str, Any], fmt: str, f: PreferenceFieldMapping) -> tuple[str | Turns, str, str]:
    """(prompt, chosen, rejected) of one row, or RowError with the drop reason."""
    prompt: str | Turns
    if fmt == "preference":
        raw_p, raw_c, raw_r = [_get(data, k) for k in (f.prompt, f.chosen, f.rejected)]
        if isinstance(raw_p, list):
            prompt = _turns(raw_p, f.prompt)
        elif isinstance(raw_p, str):
            prompt = raw_p
        else:
            raise RowError(
                "wrong_type", f"field {f.prompt!r} is {type(raw_p).__name__}, not a string or a list of turns"
            )
        chosen, rejected = _string(raw_c, f.chosen), _string(raw_r, f.rejected)
    elif fmt == "preference_messages":
        raw_c, raw_r = [_get(data, k) for k in (f.chosen, f.rejected)]
        c, r = _turns(raw_c, f.chosen), _turns(raw_r, f.rejected)
        for conv, name in ((c, f.chosen), (r, f.rejected)):
            if not conv or conv[-1][0] != "assistant":
                last = repr(conv[-1][0]) if conv else "missing"
                raise RowError(
                    "last_turn_not_assistant", f"the last turn of {name!r} is {last}, not 'assistant'"
                )
        if c[:-1] != r[:-1]:
            pc, pr = c[:-1], r[:-1]
            i = next(
                (i for i, (a, b) in enumerate(zip(pc, pr, strict=False)) if a != b), min(len(pc), len(pr))
            )
            raise RowError(
                "conversations_differ",
                f"{f.chosen!r} and {f.rejected!r} differ at turn {i}: only their last (assistant) turn may differ",
            )
        prompt, chosen, rejected = c[:-1], c[-1][1], r[-1][1]
    else:
        raise ValueError(f"unknown preference format {fmt!r}")
    if not any(t.strip() for t in ([prompt] if isinstance(prompt, str) else [t for _, t in prompt])):
        raise RowError("empty_prompt", "the prompt is empty")
    for val, name in ((chosen, f.chosen), (rejected, f.rejected)):
        if not val.strip():
            raise RowError("empty_response", f"{name!r} is empty")
    if chosen == rejected:
        raise RowError("chosen_equals_rejected", f"{f.chosen!r} and {f.rejected!r} are the same text")
    return prompt, chosen, rejected


def _prompt_and_response(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
    if not trained:
        return None
    return ids[: trained[0]], ids[trained[0] : trained[-1] + 1]


def _pairs(rows: list[_Row], tok: Any, templ: bool, max_len: int, files: _Files) -> list[_Pair]:
    """Tokenize each row's two SFT sequences and cut them into prompt and responses; length rule."""
    out: list[_Pair] = []
    for start in range(0, len(rows), BATCH):
        ok: list[_Row] = []
        texts: list[Formatted] = []
        for r in rows[start : start + BATCH]:
            try:
                both = [r.formatted(resp, tok, templ) for resp in (r.chosen, r.rejected)]
            except RowError as e:
                files.drop(r, e.reason, str(e))
                continue
            ok.append(r)
            texts += both
        enc = tokenize_batch(tok, texts, not templ) if texts else []
        for i, r in enumerate(ok):
            c, rj = _prompt_and_response(*enc[2 * i]), _prompt_and_response(*enc[2 * i + 1])
            if c is None or rj is None:
                files.drop(r, "no_trainable_tokens", "no response token survived tokenization")
                continue
            (prompt, chosen), (prompt_r, rejected) = c, rj
            if prompt != prompt_r:
                files.drop(r, "prompt_tokenization_differs", "a token spans the prompt/response boundary")
                continue
            if chosen == rejected:
                files.drop(r, "chosen_equals_rejected", "chosen and rejected are the same tokens")
                continue
            longer = max(len(chosen), len(rejected))
            # at least one prompt token must stay: the first response token is predicted from it
            if longer + 1 > max_len:
                files.drop(
                    r, "too_long", f"a {longer}-token response leaves no room in maxSeqLength {max_len}"
                )
                continue
            if len(prompt) + longer > max_len:
                prompt = prompt[len(prompt) + longer - max_len :]
                files.truncated_prompts += 1
            out.append((r, PreferencePair(prompt, chosen, rejected, r.where)))
    return out


# ---- files and the whole set ----


def _read(
    files: _Files, uris: list[str], split_name: str, ds: PreferenceDataset, cfg: TrainerConfig, cache_dir: str
) -> list[_Row]:
    """Valid rows of one split's files (train or eval), exact duplicates within the split dropped."""
    rows: list[_Row] = []
    seen: dict[tuple[str | Turns, str, str], str] = {}
    for uri in uris:
        fi = files.add(uri, split_name)
        try:
            for raw in iter_rows([uri], files.drops[fi], cache_dir, cfg.output):
                try:
                    row = _Row(*parse_row(raw.data, ds.format, ds.field_mapping), raw.where, fi)
                except RowError as e:
                    files.drops[fi].drop(e.reason, raw.where, str(e))
                    continue
                if cfg.dataset.filter.dedup and row.key in seen:
                    files.drop(row, "duplicate", f"same as {seen[row.key]}")
                    continue
                seen.setdefault(row.key, row.where)
                rows.append(row)
        except PermanentError as e:
            raise PermanentError(f"spec.alignment.dataset.{split_name}: {e}") from e
    return rows


def _require(pairs: list[_Pair], files: _Files, split_name: str, uris: list[str]) -> None:
    if pairs:
        return
    d = files.merged(split_name)
    where = f"spec.alignment.dataset.{split_name}: no"
    if d.total_rows == 0:
        raise PermanentError(f"{where} preference pairs in {', '.join(uris)}: empty (no non-blank line)")
    raise PermanentError(f"{where} usable preference pairs in {', '.join(uris)}: {d.summary()}")


def _decontaminate(
    cfg: TrainerConfig, train: list[_Pair], ev: list[_Pair], files: _Files, cache_dir: str
) -> tuple[list[_Pair], dict[str, Any] | None]:
    """Drop training pairs that contain an SFT eval row's (dataset.eval) or an eval pair's prompt or
    response, by curation.decontamination's rule (curation/decontam.py)."""
    cur = cfg.dataset.curation
    if cur is None or cur.decontamination is None:
        return train, None
    dc, ds = cur.decontamination, cfg.dataset
    sft_eval = list(iter_rows(list(ds.eval or []), DropReport(), cache_dir, cfg.output))
    texts = [(c, r.where) for r in sft_eval if (c := content_of(r.data, ds.format, ds.field_mapping))]
    for r, _ in ev:  # the rejected response as an "answer" of its own: a leak of either is a leak
        texts += [(Content(r.prompt_text, r.chosen, ()), r.where), (Content("", r.rejected, ()), r.where)]
    index = EvalIndex(texts, dc.ngram)
    kept: list[_Pair] = []
    leaked: set[str] = set()
    hits: list[dict[str, Any]] = []
    for r, p in train:
        text = f"{r.prompt_text}\n{r.chosen}\n{r.rejected}"
        hit = index.best_hit(text)
        if hit is None or hit.overlap < dc.threshold:
            kept.append((r, p))
            continue
        leaked.add(hit.eval.where)
        files.drop(r, "contaminated", f"{hit.overlap:.0%} of eval {hit.eval.part} {hit.eval.where}")
        if len(hits) < MAX_EXAMPLES:
            hits.append(
                {
                    "train": r.where,
                    "eval": hit.eval.where,
                    "part": hit.eval.part,
                    "overlap": round(hit.overlap, 4),
                    "train_text": snippet(text),
                }
            )
    checked = len({t.where for t in index.texts})
    check_contamination_gate(
        cur, len(leaked), checked, [f"{h['train']} contains eval {h['eval']}" for h in hits]
    )
    return kept, {
        "ngram": dc.ngram,
        "threshold": dc.threshold,
        "eval_rows": len(sft_eval) + len(ev),
        "eval_rows_checked": checked,
        "eval_rows_leaked": len(leaked),
        "train_rows_removed": len(train) - len(kept),
        "examples": hits,
    }


def content_hash(train: list[PreferencePair], ev: list[PreferencePair]) -> str:
    """sha256 of the pairs' token ids, train then eval: equal hashes, equal preference data."""
    h = hashlib.sha256()
    for part, pairs in ((b"train", train), (b"eval", ev)):
        h.update(part)
        for p in pairs:
            for ids in (p.prompt, p.chosen, p.rejected):
                h.update(len(ids).to_bytes(4, "little") + array("q", ids).tobytes())
    return "sha256:" + h.hexdigest()


def _tokens(pairs: list[PreferencePair]) -> int:
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def load_preference_data(cfg: TrainerConfig, tokenizer: Any) -> PreferenceData:
    """spec.alignment.dataset as tokenized train and eval pairs plus the data report. Raises PermanentError
    (naming the field, files, counts and file:line examples) when no usable pair is left or a gate fails."""
    if cfg.alignment is None:
        raise ValueError("load_preference_data needs spec.alignment")
    ds = cfg.alignment.dataset
    max_len = ds.max_seq_length or cfg.dataset.max_seq_length
    templ = bool(tokenizer.chat_template)
    cache_dir = os.path.join(cfg.runtime.work_dir, "data")
    files = _Files()

    def pairs_of(uris: list[str], split_name: str) -> list[_Pair]:
        rows = _read(files, uris, split_name, ds, cfg, cache_dir)
        pairs = _pairs(rows, tokenizer, templ, max_len, files)
        _require(pairs, files, split_name, uris)
        return pairs

    train = pairs_of(list(ds.train), "train")
    if ds.eval:
        ev = pairs_of(list(ds.eval), "eval")
    else:
        train, ev = split(train, ds.eval_split, cfg.training.seed)
    train, contamination = _decontaminate(cfg, train, ev, files, cache_dir)
    _require(train, files, "train", list(ds.train))

    kept = Counter(r.file for r, _ in train + ev)
    for i, d in enumerate(files.drops):
        d.kept_rows = kept[i]
    check_drop_gate(cfg.dataset.curation, files.merged("train"))
    tr, evp = [p for _, p in train], [p for _, p in ev]
    per_file: dict[str, Any] = {}
    for uri, s, d in zip(files.uris, files.splits, files.drops, strict=True):
        per_file[uri if uri not in per_file else f"{uri} ({s})"] = {"split": s, **d.as_dict()}
    report = {
        **files.merged().as_dict(),  # total_rows, kept_rows, dropped {reason: n}, examples {reason: [...]}
        "files": per_file,
        "format": ds.format,
        "max_seq_length": max_len,
        "truncated_prompts": files.truncated_prompts,
        "eval_from": "files" if ds.eval else "split",
        "contamination": contamination,
        "train_pairs": len(tr),
        "eval_pairs": len(evp),
        "tokens": {"train": _tokens(tr), "eval": _tokens(evp)},
        "content_hash": content_hash(tr, evp),
    }
    return PreferenceData(tr, evp, report)
