"""The operator's own Prometheus metrics (prometheus-client, served on --metrics-port)."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .render.phase import ALL_PHASES

REGISTRY = CollectorRegistry(auto_describe=True)

HANDLER_INVOCATIONS = Counter(
    "sftjob_operator_handler_invocations", "Handler invocations, by handler.", ["handler"], registry=REGISTRY
)
HANDLER_ERRORS = Counter(
    "sftjob_operator_handler_errors", "Handler invocations that raised, by handler.", ["handler"],
    registry=REGISTRY,
)
HANDLER_DURATION = Histogram(
    "sftjob_operator_handler_duration_seconds", "Handler run time, by handler.", ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
JOBS = Gauge("sftjob_operator_jobs", "SFTJobs known to this operator, by phase.", ["phase"], registry=REGISTRY)
TRANSITIONS = Counter(
    "sftjob_operator_phase_transitions", "Phase transitions, by from_phase and to_phase.",
    ["from_phase", "to_phase"], registry=REGISTRY,
)
TIME_TO_TRAINING = Histogram(
    "sftjob_operator_time_to_training_seconds", "From SFTJob creation to the first trainer pod running.",
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600), registry=REGISTRY,
)
RESTARTS = Counter(
    "sftjob_operator_restarts", "Retryable trainer failures observed (each resumes from a checkpoint).",
    registry=REGISTRY,
)
PROGRESS_READS = Counter(
    "sftjob_operator_progress_reads", "Reads of trainer /metrics endpoints, by result.", ["result"],
    registry=REGISTRY,
)

for _phase in ALL_PHASES:
    JOBS.labels(phase=_phase)


class PhaseBook:
    """uid -> phase for every SFTJob seen; feeds the sftjob_operator_jobs gauge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[str, str] = {}

    def set(self, uid: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop(uid, None)
            else:
                self._phases[uid] = phase
            counts = {p: 0 for p in ALL_PHASES}
            for p in self._phases.values():
                counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            JOBS.labels(phase=p).set(n)


PHASES = PhaseBook()

F = TypeVar("F", bound=Callable[..., Any])


def instrumented(name: str) -> Callable[[F], F]:
    """Count invocations, errors and duration of a (sync or async) handler under `name`."""

    def wrap(fn: F) -> F:
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


def serve(port: int, address: str) -> None:
    if port:
        start_http_server(port, addr=address, registry=REGISTRY)
