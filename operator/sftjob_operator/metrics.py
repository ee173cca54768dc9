"""The operator's own Prometheus metrics (prometheus-client, served on --metrics-port)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from sftjob_api import Phase

from .render.recovery import CAUSE_KINDS

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double the series count for nothing here
REGISTRY = CollectorRegistry(auto_describe=True)

HANDLER_INVOCATIONS = Counter(
    "sftjob_operator_handler_invocations", "Handler invocations, by handler.", ["handler"], registry=REGISTRY
)
HANDLER_ERRORS = Counter(
    "sftjob_operator_handler_errors",
    "Handler invocations that raised, by handler.",
    ["handler"],
    registry=REGISTRY,
)
HANDLER_DURATION = Histogram(
    "sftjob_operator_handler_duration_seconds",
    "Handler run time, by handler.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
JOBS = Gauge(
    "sftjob_operator_jobs", "SFTJobs known to this operator, by phase.", ["phase"], registry=REGISTRY
)
TRANSITIONS = Counter(
    "sftjob_operator_phase_transitions",
    "Phase transitions, by from_phase and to_phase.",
    ["from_phase", "to_phase"],
    registry=REGISTRY,
)
TIME_TO_TRAINING = Histogram(
    "sftjob_operator_time_to_training_seconds",
    "From SFTJob creation to the first trainer pod running.",
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
    registry=REGISTRY,
)
RESTARTS = Counter(
    "sftjob_operator_restarts",
    "Group restarts counted against runPolicy.backoffLimit (each resumes every rank from a checkpoint).",
    registry=REGISTRY,
)
RECOVERIES = Counter(
    "sftjob_operator_recoveries",
    "Group restarts, by cause (Failed: a retryable pod failure, Disrupted: preemption/drain, Stalled,"
    " Resized: an elastic group re-formed at another size).",
    ["cause"],
    registry=REGISTRY,
)
RECOVERY_SECONDS = Histogram(
    "sftjob_operator_recovery_seconds",
    "From a group restart to the first training step seen after it.",
    buckets=(5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
    registry=REGISTRY,
)
PROGRESS_READS = Counter(
    "sftjob_operator_progress_reads",
    "Reads of trainer /metrics endpoints, by result.",
    ["result"],
    registry=REGISTRY,
)
LAG_PROBE_INTERVAL = 0.5  # seconds between two event-loop lag probes
EVENT_LOOP_LAG = Histogram(
    "sftjob_operator_event_loop_lag_seconds",
    f"How late the event loop (kopf's watches and handlers) wakes a probe sleeping {LAG_PROBE_INTERVAL} s.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)

for _phase in Phase:
    JOBS.labels(phase=_phase.value)
for _cause in CAUSE_KINDS:  # every cause's series exists (at 0) from the start
    RECOVERIES.labels(cause=_cause)


class PhaseBook:
    """Phase, Stuck and eval loss of every SFTJob seen, by uid; feeds sftjob_operator_jobs{phase} and the
    per-job series sftjob_operator_job_phase{namespace,sftjob,phase} == 1, sftjob_operator_job_stuck and
    sftjob_operator_job_eval_loss, which the chart's alert rules and dashboards use. Per-job series vanish
    when the SFTJob is deleted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # uid -> (namespace, name, phase, stuck, eval loss)
        self._jobs: dict[str, tuple[str, str, str, bool, float | None]] = {}

    def set(
        self,
        uid: str,
        phase: str | None,
        namespace: str = "",
        name: str = "",
        stuck: bool = False,
        eval_loss: float | None = None,
    ) -> None:
        with self._lock:
            if phase is None:
                self._jobs.pop(uid, None)
            else:
                self._jobs[uid] = (namespace, name, phase, stuck, eval_loss)
            counts: dict[str, int] = {p.value: 0 for p in Phase}
            for job in self._jobs.values():
                counts[job[2]] = counts.get(job[2], 0) + 1
        for p, n in counts.items():
            JOBS.labels(phase=p).set(n)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            jobs = list(self._jobs.values())
        phase = GaugeMetricFamily(
            "sftjob_operator_job_phase",
            "1 for the current phase of each SFTJob.",
            labels=["namespace", "sftjob", "phase"],
        )
        stuck = GaugeMetricFamily(
            "sftjob_operator_job_stuck",
            "1 while the SFTJob's Stuck condition is True.",
            labels=["namespace", "sftjob"],
        )
        eval_loss = GaugeMetricFamily(
            "sftjob_operator_job_eval_loss",
            "Held-out loss reported by the SFTJob's evaluation stage.",
            labels=["namespace", "sftjob"],
        )
        for ns, name, p, is_stuck, loss in jobs:
            phase.add_metric([ns, name, p], 1.0)
            stuck.add_metric([ns, name], 1.0 if is_stuck else 0.0)
            if loss is not None:
                eval_loss.add_metric([ns, name], loss)
        yield phase
        yield stuck
        yield eval_loss

    def describe(self) -> list[Metric]:
        return []


PHASES = PhaseBook()
REGISTRY.register(PHASES)

F = TypeVar("F", bound=Callable[..., Any])


def instrumented(name: str) -> Callable[[F], F]:
    """Count invocations, errors and duration of a (sync or async) handler under `name`."""

    def wrap(fn: F) -> F:
        # Create the labelled series now, so that dashboards and alerts see 0 rather than nothing.
        HANDLER_INVOCATIONS.labels(handler=name)
        HANDLER_ERRORS.labels(handler=name)
        HANDLER_DURATION.labels(handler=name)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                HANDLER_INVOCATIONS.labels(handler=name).inc()
                t0 = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                except BaseException:
                    HANDLER_ERRORS.labels(handler=name).inc()
                    raise
                finally:
                    HANDLER_DURATION.labels(handler=name).observe(time.perf_counter() - t0)

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            HANDLER_INVOCATIONS.labels(handler=name).inc()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except BaseException:
                HANDLER_ERRORS.labels(handler=name).inc()
                raise
            finally:
                HANDLER_DURATION.labels(handler=name).observe(time.perf_counter() - t0)

        return wrapper  # type: ignore[return-value]

    return wrap


async def probe_event_loop_lag() -> None:
    """Runs on the operator's event loop until cancelled: a loop busy with other work wakes the probe late."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PROBE_INTERVAL
        await asyncio.sleep(LAG_PROBE_INTERVAL)
        EVENT_LOOP_LAG.observe(max(loop.time() - due, 0.0))


def serve(port: int, address: str) -> None:
    if port:
        start_http_server(port, addr=address, registry=REGISTRY)
