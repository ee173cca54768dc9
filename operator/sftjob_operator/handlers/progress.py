"""The progress reader: rank 0's trainer /metrics -> status.progress and status.artifacts.latestCheckpoint
(rate-limited per SFTJob); it also feeds hang detection (when each step was first seen) and fills the newest
recovery's downtime. Rank 0 is that of the group stage the run is in (train, then align: the same metric
names), read while the run is in that stage's phase.

The trainer's port is tenant-controlled, so a read must never block: the reconcile only picks the target
(`progress_target`, under the SFTJob's lock); the read itself (`fetch_metrics`) runs afterwards on its own
small pool with an overall deadline and a size cap, and only the status write (`apply_progress`) takes the
lock again (handlers/reconcile.py `Reconciler.progress`)."""

from __future__ import annotations

import http.client
import io
import logging
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sftjob_api import SFTJobSpec, SFTJobStatus, Stage
from sftjob_api.layout import checkpoint_uri
from sftjob_api.status import Progress

from .. import metrics
from ..render.observe import PodObs
from ..render.progress import (
    checkpoint_step,
    parse_data,
    parse_progress,
    progress_changed,
)
from ..render.recovery import with_downtime
from .state import Memo, Obj

log = logging.getLogger("sftjob_operator.reconcile")

MAX_METRICS_BYTES = 2_000_000  # a trainer's /metrics is a few KiB; anything near this is not ours to parse


class MetricsReadError(Exception):
    """A trainer's /metrics could not be read in time, in size, or as HTTP 200."""


@dataclass(frozen=True)
class ProgressTarget:
    """What one reconcile decided to read, and the SFTJob as that reconcile wrote it."""

    host: str
    port: int
    train_uid: str  # the group Job attempt read (train or align)
    body: Obj  # the SFTJob as the reconcile wrote it (the status write chains on its resourceVersion)
    spec: SFTJobSpec
    stage: Stage = Stage.TRAIN  # the group stage read; its phase is the one the status must still be in


def progress_target(
    pods: list[PodObs],
    port: int,
    interval: float,
    memo: Memo,
    train_uid: str,
    body: Obj,
    spec: SFTJobSpec,
    stage: Stage = Stage.TRAIN,
) -> ProgressTarget | None:
    """Rank 0 of `stage`'s group: its address when a read is due (at most one progress write per interval
    per SFTJob)."""
    if time.monotonic() - memo.last_progress_write < interval * 0.8:
        return None
    rank0 = next(
        (
            p
            for p in pods
            if p.stage == stage and p.index == 0 and p.phase == "Running" and p.ip and not p.deleting
        ),
        None,
    )
    if rank0 is None or not rank0.ip:
        return None
    return ProgressTarget(rank0.ip, port, train_uid, body, spec, stage)


class _Recorded:
    """Bytes already read, offered to http.client's parser as if they were a socket."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, *_: object, **__: object) -> io.BytesIO:
        return io.BytesIO(self.data)


def http_body(raw: bytes) -> str:
    """The body of a complete HTTP/1.x response (status line, headers, body), or MetricsReadError."""
    resp = http.client.HTTPResponse(_Recorded(raw))  # type: ignore[arg-type]
    try:
        resp.begin()
        body = resp.read()
    except (http.client.HTTPException, ValueError) as e:
        raise MetricsReadError(f"not an HTTP response: {type(e).__name__}: {e}") from e
    if resp.status != 200:
        raise MetricsReadError(f"HTTP {resp.status}")
    return body.decode("utf-8", "replace")


def _complete(raw: bytes) -> bool:
    """Whether `raw` already holds the whole response by its Content-Length (a server that keeps the
    connection open after answering must not cost the full deadline)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def fetch_metrics(host: str, port: int, deadline: float, max_bytes: int = MAX_METRICS_BYTES) -> str:
    """GET /metrics, bounded as a whole: every socket operation waits at most for what is left of `deadline`
    seconds (urllib's timeout bounds each read only: a trickle of one byte a second never ends), and more
    than `max_bytes` is refused."""
    end = time.monotonic() + deadline

    def left() -> float:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise MetricsReadError(f"no complete response from {host}:{port} within {deadline:g} s")
        return remaining

    request = f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    raw = bytearray()
    try:
        with socket.create_connection((host, port), timeout=left()) as sock:
            sock.settimeout(left())
            sock.sendall(request)
            while not _complete(bytes(raw)):
                sock.settimeout(left())
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
                if len(raw) > max_bytes:
                    raise MetricsReadError(f"response from {host}:{port} is over {max_bytes} bytes")
    except TimeoutError as e:
        raise MetricsReadError(f"no complete response from {host}:{port} within {deadline:g} s") from e
    except OSError as e:
        raise MetricsReadError(f"{host}:{port}: {e}") from e
    return http_body(bytes(raw))


@dataclass(frozen=True)
class Page:
    """A trainer's /metrics page that holds a training step, parsed once, and when it was read (hang
    detection wants the time of the read, not of the status write)."""

    text: str
    progress: Progress
    read_at: datetime


def progress_update(
    target: ProgressTarget, meta: Obj, status: SFTJobStatus, page: Page, memo: Memo
) -> dict[str, object]:
    """The status fields a read page changes (empty: nothing to write)."""
    now = page.read_at
    # Whose steps these are: the align group's count from 0 again (render/status.group_progress).
    progress = page.progress.model_copy(
        update={"stage": None if target.stage == Stage.TRAIN else str(target.stage)}
    )
    update: dict[str, object] = {}
    step = progress.step or 0
    memo.steps.observe(target.train_uid, step, now)  # hang detection (render/recovery.detect_stall)
    after_restart = with_downtime(status, step, now, target.stage)
    if after_restart is not None:
        update["recoveries"] = after_restart.recoveries
        metrics.RECOVERY_SECONDS.observe(after_restart.recoveries[-1].downtime_seconds or 0.0)
    if progress_changed(status.progress, progress):
        update["progress"] = progress
    data = parse_data(page.text)
    if data is not None and data != status.data:
        update["data"] = data
    saved = checkpoint_step(page.text)
    if saved is not None and status.artifacts is not None:
        latest = checkpoint_uri(
            target.spec, meta["namespace"], meta["name"], meta["uid"], saved, target.stage
        )
        if status.artifacts.latest_checkpoint != latest:
            update["artifacts"] = status.artifacts.model_copy(update={"latest_checkpoint": latest})
    return update


def read_metrics(target: ProgressTarget, deadline: float) -> Page | None:
    """The page, or None (unreadable, or no training step in it yet); counted."""
    try:
        text = fetch_metrics(target.host, target.port, deadline)
    except MetricsReadError as e:
        metrics.PROGRESS_READS.labels(result="error").inc()
        log.debug("progress read %s:%s failed: %s", target.host, target.port, e)
        return None
    read_at = datetime.now(UTC)
    progress = parse_progress(text, read_at)
    if progress is None:
        metrics.PROGRESS_READS.labels(result="empty").inc()
        return None
    metrics.PROGRESS_READS.labels(result="ok").inc()
    return Page(text, progress, read_at)
