"""Progress from the rank-0 trainer's Prometheus /metrics text (pure parsing and formatting)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Trainer metric names (sftjob_trainer.metrics); the first one present wins.
STEP = ("sft_train_step",)
TOTAL = ("sft_train_total_steps", "sft_train_steps_total_planned")
LOSS = ("sft_train_loss",)
TPS = ("sft_train_tokens_per_second",)
ETA = ("sft_train_eta_seconds",)
EPOCH = ("sft_train_epoch",)
# The newest checkpoint: saved by this run, or (before its first save) the one it resumed from.
CHECKPOINT = ("sft_train_checkpoint_step", "sft_train_resumed_from_step")


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


def _first(samples: dict[str, float], names: tuple[str, ...]) -> float | None:
    for n in names:
        if n in samples:
            return samples[n]
    return None


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


def parse_progress(text: str, now: datetime) -> dict[str, Any] | None:
    """status.progress (camelCase) from metrics text; None when the text has no training step yet."""
    samples = _samples(text)
    step = _first(samples, STEP)
    if step is None:
        return None
    total = _first(samples, TOTAL)
    out: dict[str, Any] = {"step": int(step)}
    if total and total > 0:
        pct = round(min(step / total, 1.0) * 100, 1)
        out.update(totalSteps=int(total), percent=pct, summary=f"{int(step)}/{int(total)} ({pct:g}%)")
    else:
        out["summary"] = f"{int(step)}"
    loss = _first(samples, LOSS)
    if loss is not None:
        out["loss"] = round(loss, 4)
    tps = _first(samples, TPS)
    if tps is not None:
        out["tokensPerSecond"] = round(tps, 1)
    eta = _first(samples, ETA)
    if eta is not None:
        out["eta"] = format_duration(eta)
    epoch = _first(samples, EPOCH)
    if epoch is not None:
        out["epoch"] = round(epoch, 3)
    out["lastUpdate"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def checkpoint_step(text: str) -> int | None:
    """Step of the newest complete checkpoint the trainer reports; None when it has none (yet)."""
    samples = _samples(text)
    steps = [samples[n] for n in CHECKPOINT if n in samples]
    step = int(max(steps)) if steps else 0
    return step if step > 0 else None


def progress_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether anything but lastUpdate differs (unchanged progress is not written)."""
    if not old:
        return True

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "lastUpdate"}

    return strip(old) != strip(new)
