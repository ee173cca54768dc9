# mypy: disable-error-code="arg-type"
"""kopf handlers: thin glue from watch events and timers to `Reconciler.reconcile` (see reconcile.py).

Registered into a registry by `register()` so that settings (timer interval, finalizer use) apply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
from typing import Any

import kopf

from sftjob_api import GROUP, PLURAL, TERMINAL_PHASES, VERSION, SpecError, parse_spec

from .. import metrics
from ..kopf_storage import InMemoryDiffBase
from ..render.names import LABEL_JOB_NAME
from ..settings import Settings
from .kube import Kube, new_api_client
from .reconcile import Reconciler
from .state import Snapshot, slim_job, slim_pod, slim_sftjob

log = logging.getLogger("sftjob_operator.handlers")


def _snapshot(namespace: str, name: str, jobs_index: Any, pods_index: Any) -> Snapshot:
    """Copy this SFTJob's children out of kopf's indexes (on the event loop, so nothing mutates them)."""
    key = (namespace, name)
    jobs = [dict(j) for j in jobs_index.get(key, [])] if key in jobs_index else []
    pods = [dict(p) for p in pods_index.get(key, [])] if key in pods_index else []
    return Snapshot(jobs=jobs, pods=pods)


def _ttl_pending(spec: Any, jobs_index: Any, namespace: str, name: str) -> bool:
    """Whether a finished SFTJob still has TTL clean-up due (or coming)."""
    try:
        policy = parse_spec(dict(spec)).run_policy
    except SpecError:
        return False
    if policy.ttl_seconds_after_finished is None:
        return False
    if policy.ttl_policy == "DeleteSFTJob":
        return True
    return (namespace, name) in jobs_index  # DeleteChildren: done once no child Job is left


# Threads reading trainers' /metrics (each read bounded by --progress-timeout): apart from the reconcile pool,
# so slow or hostile trainer ports delay only progress, never another SFTJob's reconcile.
PROGRESS_WORKERS = 4


def register(registry: kopf.OperatorRegistry, settings: Settings, diffbase: InMemoryDiffBase) -> Reconciler:
    api = new_api_client(settings.kubeconfig, pool_size=settings.workers + PROGRESS_WORKERS + 4)
    reconciler = Reconciler(settings, Kube(api, settings.request_timeout))
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=settings.workers, thread_name_prefix="reconcile"
    )
    progress_pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=PROGRESS_WORKERS, thread_name_prefix="progress"
    )

    async def run(
        namespace: str, name: str, sft_jobs: Any, sft_pods: Any, sft_objects: Any, tick: bool = False
    ) -> str | None:
        snap = _snapshot(namespace, name, sft_jobs, sft_pods)
        key = (namespace, name)
        seen = next(iter(sft_objects.get(key, [])), None) if key in sft_objects else None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            executor,
            functools.partial(
                reconciler.reconcile,
                namespace,
                name,
                snap,
                tick,
                json.loads(json.dumps(seen)) if seen else None,
            ),
        )

    children = {LABEL_JOB_NAME: kopf.PRESENT}

    # ---- indexes of children (in memory, fed by watch streams) ---------------------------------------------

    @kopf.index("batch", "v1", "jobs", id="sft_jobs", labels=children, registry=registry)
    def sft_jobs(namespace: str, labels: Any, body: Any, **_: Any) -> dict[tuple[str, str], Any]:
        return {(namespace, labels[LABEL_JOB_NAME]): slim_job(body)}

    @kopf.index("", "v1", "pods", id="sft_pods", labels=children, registry=registry)
    def sft_pods(namespace: str, labels: Any, body: Any, **_: Any) -> dict[tuple[str, str], Any]:
        return {(namespace, labels[LABEL_JOB_NAME]): slim_pod(body)}

    @kopf.index(GROUP, VERSION, PLURAL, id="sft_objects", registry=registry)
    def sft_objects(namespace: str, name: str, body: Any, **_: Any) -> dict[tuple[str, str], Any]:
        return {(namespace, name): slim_sftjob(body)}

    # ---- the SFTJob itself ---------------------------------------------------------------------------------

    async def _reconcile_or_retry(
        handler: str, namespace: str, name: str, sft_jobs: Any, sft_pods: Any, sft_objects: Any
    ) -> None:
        try:
            await run(namespace, name, sft_jobs, sft_pods, sft_objects)
        except Exception as e:
            # API trouble (never user input: that ends in Failed/InvalidSpec): let kopf retry with backoff.
            raise kopf.TemporaryError(f"{handler}: {type(e).__name__}: {e}", delay=5) from e

    @kopf.on.create(GROUP, VERSION, PLURAL, id="create", registry=registry)
    @metrics.instrumented("create")
    async def on_create(
        namespace: str, name: str, sft_jobs: Any, sft_pods: Any, sft_objects: Any, **_: Any
    ) -> None:
        await _reconcile_or_retry("create", namespace, name, sft_jobs, sft_pods, sft_objects)

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="resume", registry=registry)
    @metrics.instrumented("resume")
    async def on_resume(
        namespace: str, name: str, sft_jobs: Any, sft_pods: Any, sft_objects: Any, **_: Any
    ) -> None:
        await _reconcile_or_retry("resume", namespace, name, sft_jobs, sft_pods, sft_objects)

    @kopf.on.update(GROUP, VERSION, PLURAL, id="update", registry=registry)
    @metrics.instrumented("update")
    async def on_update(
        namespace: str, name: str, sft_jobs: Any, sft_pods: Any, sft_objects: Any, **_: Any
    ) -> None:
        await _reconcile_or_retry("update", namespace, name, sft_jobs, sft_pods, sft_objects)

    @kopf.on.delete(
        GROUP, VERSION, PLURAL, id="delete", registry=registry, optional=not settings.use_finalizer
    )
    @metrics.instrumented("delete")
    async def on_delete(namespace: str, name: str, uid: str, **_: Any) -> None:
        # Children go with the SFTJob through their ownerReferences (garbage collector).
        reconciler.forget(namespace, name, uid)
        diffbase.forget(uid)

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        id="tick",
        interval=settings.progress_interval,
        registry=registry,
        initial_delay=min(settings.progress_interval, 5.0),
        # a failed tick is retried after `backoff` (kopf's default: 60 s), which would stall TTL, stuck
        # detection and progress for a minute
        backoff=max(settings.progress_interval, 1.0),
    )
    @metrics.instrumented("timer")
    async def tick(
        namespace: str,
        name: str,
        status: Any,
        spec: Any,
        sft_jobs: Any,
        sft_pods: Any,
        sft_objects: Any,
        **_: Any,
    ) -> None:
        # Progress, stuck detection and TTL are time-based: no watch event announces them.
        if status.get("phase") in TERMINAL_PHASES and not _ttl_pending(spec, sft_jobs, namespace, name):
            return  # finished and nothing left to clean up: no API call at all
        try:
            await run(namespace, name, sft_jobs, sft_pods, sft_objects, tick=True)
            await asyncio.get_running_loop().run_in_executor(
                progress_pool, reconciler.progress, namespace, name
            )
        except Exception as e:
            log.warning("timer on %s/%s: %s: %s", namespace, name, type(e).__name__, e)
            raise

    # ---- child Jobs drive transitions ----------------------------------------------------------------------

    @kopf.on.event("batch", "v1", "jobs", id="child_job_event", labels=children, registry=registry)
    @metrics.instrumented("child_job_event")
    async def child_job_event(
        namespace: str, labels: Any, sft_jobs: Any, sft_pods: Any, sft_objects: Any, **_: Any
    ) -> None:
        parent = labels[LABEL_JOB_NAME]
        if (namespace, parent) not in sft_objects:
            # The SFTJob is gone and the garbage collector is deleting its Jobs: reading it would only 404.
            # (kopf fills every index before any handler runs, so a live SFTJob is always in it.)
            return
        try:
            await run(namespace, parent, sft_jobs, sft_pods, sft_objects)
        except Exception as e:  # event handlers are not retried: the timer resyncs
            log.warning("reconciling %s/%s after a Job event: %s: %s", namespace, parent, type(e).__name__, e)
            raise

    @kopf.on.probe(id="reconciler", registry=registry)
    def probe(**_: Any) -> str:
        return "ok"

    return reconciler
