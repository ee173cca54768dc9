"""The operator process: `python -m sftjob_operator [flags]` or `sftjob_operator.main.run(argv)`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import kopf

from sftjob_api import GROUP, PLURAL

from . import metrics
from .handlers import register
from .kopf_storage import InMemoryDiffBase, UnmarkedProgressStorage
from .render.names import LABEL_JOB_NAME
from .settings import Settings, from_args

# How long kopf waits for the watch to show its own patch before handling an older copy (see configure).
CONSISTENCY_TIMEOUT_S = 60.0

log = logging.getLogger("sftjob_operator")


class RetryForever:
    """kopf's delays between retries of a failed API request: 1, 1, 2, 3, then every 5 s for as long as it
    takes. kopf's default (1 ... 21 s, 54 s in all) escalates once spent; and in tests/chaos its long last
    delays resumed the watches ~35 s after a 30 s apiserver outage had ended. Re-iterable: kopf iterates it
    afresh for every request."""

    def __iter__(self) -> Iterator[float]:
        yield from (1.0, 1.0, 2.0, 3.0)
        yield from itertools.repeat(5.0)


def configure(settings: Settings, kopf_settings: kopf.OperatorSettings, diffbase: InMemoryDiffBase) -> None:
    """Apply our settings to kopf's."""
    # status is a structural schema that prunes unknown fields: keep kopf's retry bookkeeping in annotations
    # (written only when a handler fails), and what it last handled in memory (kopf_storage.py: no write).
    kopf_settings.persistence.progress_storage = UnmarkedProgressStorage(prefix=settings.annotation_prefix)
    kopf_settings.persistence.diffbase_storage = diffbase
    kopf_settings.persistence.finalizer = settings.finalizer
    # After its finalizer patch kopf runs the create handler only once the watch shows the patched version,
    # or when this runs out (kopf's default: 5 s), on the copy from before the patch: our status write on that
    # copy then fails 409 and costs a re-read and a second write. On a loaded control plane the watch lags
    # past 5 s (issue 17: 769 conflicts at N = 1000); waiting longer costs nothing when it does not.
    kopf_settings.persistence.consistency_timeout = CONSISTENCY_TIMEOUT_S
    kopf_settings.watching.server_timeout = settings.watch_server_timeout
    kopf_settings.watching.client_timeout = settings.watch_client_timeout
    kopf_settings.watching.connect_timeout = 10
    kopf_settings.networking.request_timeout = settings.request_timeout
    kopf_settings.networking.connect_timeout = 10
    kopf_settings.networking.error_backoffs = RetryForever()
    # Only our children travel over the Job and Pod watches (server-side label selectors).
    kopf_settings.watching.label_selectors["batch", "v1", "jobs"] = LABEL_JOB_NAME
    kopf_settings.watching.label_selectors["v1", "pods"] = LABEL_JOB_NAME
    kopf_settings.posting.level = logging.WARNING  # our own Events are posted by the reconciler
    kopf_settings.posting.reporting_component = "sftjob-operator"
    kopf_settings.peering.name = settings.peering_name
    kopf_settings.peering.priority = settings.priority
    kopf_settings.peering.standalone = settings.standalone
    # Without an explicit peering name kopf auto-detects: peering if the CRDs exist, else standalone.
    kopf_settings.peering.mandatory = settings.peering_required
    kopf_settings.peering.clusterwide = settings.clusterwide
    kopf_settings.execution.max_workers = max(settings.workers, 4)


def run(argv: Sequence[str] | None = None) -> int:
    settings = from_args(argv)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if settings.log_level.upper() != "DEBUG":
        # kopf logs every handler/timer success at INFO per object: noise at hundreds of SFTJobs.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if settings.kubeconfig:
        os.environ["KUBECONFIG"] = settings.kubeconfig  # for kopf's login as well as ours

    registry = kopf.OperatorRegistry()
    diffbase = InMemoryDiffBase(ignored_fields=["status"])
    register(registry, settings, diffbase)

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        # A private registry has none of kopf's default login handlers. With --kubeconfig use kopf's own
        # kubeconfig reader (it reads $KUBECONFIG now; the kubernetes client read it at import time);
        # otherwise the kubernetes client's loader: in-cluster service account, else ~/.kube/config.
        if settings_ours.kubeconfig:
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="startup", registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings_ours, settings, diffbase)
        metrics.serve(settings_ours.metrics_port, settings_ours.metrics_address)
        log.info(
            "sftjob-operator watching %s for %s.%s; metrics on :%s",
            "all namespaces" if settings_ours.clusterwide else ",".join(settings_ours.namespaces),
            PLURAL,
            GROUP,
            settings_ours.metrics_port,
        )
        if not settings_ours.standalone:
            log.info("peering %r, peering priority %d", settings_ours.peering_name, settings_ours.priority)

    lag_probe: list[asyncio.Task[None]] = []

    @kopf.on.startup(id="event_loop_lag", registry=registry)
    async def start_lag_probe(**_: Any) -> None:
        lag_probe.append(asyncio.create_task(metrics.probe_event_loop_lag()))

    @kopf.on.cleanup(id="event_loop_lag", registry=registry)
    async def stop_lag_probe(**_: Any) -> None:
        for task in lag_probe:
            task.cancel()

    settings_ours = settings
    liveness = (
        f"http://{settings.health_address}:{settings.health_port}/healthz" if settings.health_port else None
    )
    kwargs: dict[str, Any] = {
        "registry": registry,
        "standalone": settings.standalone,
        "priority": settings.priority,
        "liveness_endpoint": liveness,
    }
    if settings.peering_required:
        kwargs["peering_name"] = settings.peering_name  # kopf then requires the peering CRDs
    if settings.clusterwide:
        kwargs["clusterwide"] = True
    else:
        kwargs["namespaces"] = list(settings.namespaces)
    try:
        kopf.run(**kwargs)
    except KeyboardInterrupt:
        return 0
    except asyncio.CancelledError:
        return 0
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
