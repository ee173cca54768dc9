"""Progress from the rank-0 trainer's Prometheus /metrics text (pure parsing and formatting)."""

from __future__ import annotations

import math
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from sftjob_api import metric_names as m
from sftjob_api.status import DataSummary, Progress

from .user_view import unmeasured_blanked

# The newest checkpoint: saved by this run, or (before its first save) the one it resumed from.
CHECKPOINT = (m.TRAIN_CHECKPOINT_STEP, m.TRAIN_RESUMED_FROM_STEP)


def _samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = float(sample.value)
            if math.isnan(value) or math.isinf(value):
                continue
            # Several label sets (ranks): keep the first seen; the endpoint is rank 0's anyway.
            out.setdefault(sample.name, value)
    return out


def parse_data(text: str) -> DataSummary | None:
    """status.data from metrics text; None before the trainer has curated its data."""
    out = DataSummary()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, int(sample.value)
            if sample.name == m.DATA_TRAIN_EXAMPLES and out.train_examples is None:
                out.train_examples, out.content_hash = value, labels.get("content_hash")
                out.reused = labels.get("reused") == "true"
            elif sample.name == f"{m.DATA_ROWS_DROPPED}_total" and "reason" in labels:
                out.dropped.setdefault(labels["reason"], value)
            elif sample.name == m.DATA_SOURCE_ROWS and "source" in labels:
                out.mixture.setdefault(labels["source"], value)
    return out if out.train_examples is not None else None


def format_duration(seconds: float) -> str:
    s = max(round(seconds), 0)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def parse_progress(text: str, now: datetime) -> Progress | None:
    """status.progress from metrics text; None when the text has no training step yet (a step gauge still at
    its start shows no loss or ETA: render/user_view.py)."""
    samples = _samples(text)
    step = samples.get(m.TRAIN_STEP)
    if step is None:
        return None
    out = Progress(step=int(step), summary=f"{int(step)}", last_update=now)
    total = samples.get(m.TRAIN_TOTAL_STEPS)
    if total and total > 0:
        out.total_steps = int(total)
        out.percent = round(min(step / total, 1.0) * 100, 1)
        out.summary = _summary(int(step), int(total), out.percent)
    if (loss := samples.get(m.TRAIN_LOSS)) is not None:
        out.loss = round(loss, 4)
    if (tps := samples.get(m.TRAIN_TOKENS_PER_SECOND)) is not None:
        out.tokens_per_second = round(tps, 1)
    if (eta := samples.get(m.TRAIN_ETA_SECONDS)) is not None:
        out.eta = format_duration(eta)
    if (epoch := samples.get(m.TRAIN_EPOCH)) is not None:
        out.epoch = round(epoch, 3)
    return unmeasured_blanked(out, int(samples.get(m.TRAIN_RESUMED_FROM_STEP, 0)))


def _summary(step: int, total: int, percent: float) -> str:
    return f"{step}/{total} ({percent:g}%)"


def training_done(progress: Progress | None) -> Progress | None:
    """The progress of a run whose train Job succeeded: every planned step is done (the trainer exits 0 only
    after its last step), though the last reading of its metrics may have been a few steps short, or taken
    before a group restart (a summary of `Restarting`: a group that failed after its last step and finished
    before the next reading)."""
    if progress is None or not progress.total_steps:
        return progress
    total = progress.total_steps
    return progress.model_copy(
        update={"step": total, "percent": 100.0, "summary": _summary(total, total, 100.0), "eta": None}
    )


def checkpoint_step(text: str) -> int | None:
    """Step of the newest complete checkpoint the trainer reports; None when it has none (yet)."""
    samples = _samples(text)
    steps = [samples[n] for n in CHECKPOINT if n in samples]
    step = int(max(steps)) if steps else 0
    return step if step > 0 else None


def progress_changed(old: Progress | None, new: Progress) -> bool:
    """Whether anything but lastUpdate differs (unchanged progress is not written)."""
    if old is None:
        return True
    return old.model_dump(exclude={"last_update"}) != new.model_dump(exclude={"last_update"})
