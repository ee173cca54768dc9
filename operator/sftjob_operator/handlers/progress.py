"""The progress reader: rank 0's trainer /metrics -> status.progress and status.artifacts.latestCheckpoint
(rate-limited per SFTJob); it also feeds hang detection (when each step was first seen) and fills the newest
recovery's downtime."""

from __future__ import annotations

import logging
import time
import urllib.request
from datetime import UTC, datetime

from sftjob_api import SFTJobSpec, SFTJobStatus, Stage
from sftjob_api.layout import checkpoint_uri

from .. import metrics
from ..render.observe import PodObs
from ..render.progress import checkpoint_step, parse_data, parse_progress, progress_changed
from ..render.recovery import with_downtime
from ..settings import Settings
from .kube import Kube
from .state import Memo, Obj

log = logging.getLogger("sftjob_operator.reconcile")


def read_progress(
    settings: Settings,
    kube: Kube,
    body: Obj,
    status: SFTJobStatus,
    spec: SFTJobSpec,
    pods: list[PodObs],
    train_uid: str,
    memo: Memo,
    now: datetime,
) -> None:
    interval = settings.progress_interval
    if time.monotonic() - memo.last_progress_write < interval * 0.8:
        return  # rate limit: at most one progress write per interval per SFTJob
    rank0 = next(
        (
            p
            for p in pods
            if p.stage == Stage.TRAIN and p.index == 0 and p.phase == "Running" and p.ip and not p.deleting
        ),
        None,
    )
    if rank0 is None:
        return
    url = f"http://{rank0.ip}:{settings.trainer_metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=settings.progress_timeout) as resp:
            text = resp.read(2_000_000).decode("utf-8", "replace")
    except Exception as e:
        metrics.PROGRESS_READS.labels(result="error").inc()
        log.debug("progress read %s failed: %s", url, e)
        return
    now = datetime.now(UTC)  # when the step was read, not when the reconcile began (hang detection)
    progress = parse_progress(text, now)
    if progress is None:
        metrics.PROGRESS_READS.labels(result="empty").inc()
        return
    metrics.PROGRESS_READS.labels(result="ok").inc()
    meta = body["metadata"]
    update: dict[str, object] = {}
    step = progress.step or 0
    memo.steps.observe(train_uid, step, now)  # hang detection (render/recovery.detect_stall)
    after_restart = with_downtime(status, step, now)
    if after_restart is not None:
        update["recoveries"] = after_restart.recoveries
        metrics.RECOVERY_SECONDS.observe(after_restart.recoveries[-1].downtime_seconds or 0.0)
    if progress_changed(status.progress, progress):
        update["progress"] = progress
    data = parse_data(text)
    if data is not None and data != status.data:
        update["data"] = data
    saved = checkpoint_step(text)
    if saved is not None and status.artifacts is not None:
        latest = checkpoint_uri(spec, meta["namespace"], meta["name"], saved)
        if status.artifacts.latest_checkpoint != latest:
            update["artifacts"] = status.artifacts.model_copy(update={"latest_checkpoint": latest})
    if not update:
        return
    kube.write_status(body, status.model_copy(update=update))
    memo.last_progress_write = time.monotonic()
