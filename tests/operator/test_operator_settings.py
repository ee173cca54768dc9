"""Operator settings from flags and environment."""

from __future__ import annotations

import itertools
from typing import Any, cast

import kopf
import pytest

from sftjob_operator.kopf_storage import InMemoryDiffBase, UnmarkedProgressStorage
from sftjob_operator.main import configure
from sftjob_operator.metrics import REGISTRY, instrumented
from sftjob_operator.settings import Settings, from_args


def test_defaults_watch_all_namespaces() -> None:
    s = from_args([], env={})
    assert s.clusterwide and s.namespaces == ()
    assert s.progress_interval == 15.0 and s.metrics_port == 8080


def test_flags_and_env() -> None:
    # the names the Helm chart's Deployment sets
    env = {
        "SFTJOB_NAMESPACES": "a, b",
        "SFTJOB_TRAINER_IMAGE": "img:1",
        "SFTJOB_PROGRESS_INTERVAL": "2",
        "SFTJOB_PEERING": "",
        "SFTJOB_WATCH_TIMEOUT": "120",
        "SFTJOB_TRAINER_SERVICE_ACCOUNT": "trainer",
        "SFTJOB_FINALIZER": "sft.tuning.dev/finalizer",
        "SFTJOB_METRICS_PORT": "9000",
        "SFTJOB_HEALTH_PORT": "9001",
    }
    s = from_args([], env=env)
    assert s.namespaces == ("a", "b") and s.default_image == "img:1" and s.progress_interval == 2.0
    assert s.standalone  # SFTJOB_PEERING="" (one replica)
    assert s.watch_server_timeout == 120 and s.watch_client_timeout == 150
    assert (s.metrics_port, s.health_port) == (9000, 9001)
    assert s.render_options().default_service_account == "trainer"
    peered = from_args([], env={"SFTJOB_PEERING": "sftjob-operator"})
    assert not peered.standalone and peered.peering_name == "sftjob-operator"
    s = from_args(
        ["-n", "x", "--namespace", "y,z", "--default-image", "img:2", "--finalizer", "f/x"], env=env
    )
    assert s.namespaces == ("x", "y", "z") and s.default_image == "img:2" and s.finalizer == "f/x"
    assert from_args(["-A"], env=env).clusterwide
    assert s.render_options().default_image == "img:2"
    with pytest.raises(SystemExit):
        from_args(["--workers", "0"], env={})


def test_replicas_started_alike_draw_distinct_peering_priorities() -> None:
    """kopf pauses every replica while two share a priority; the chart starts its replicas with the same
    flags, so each must draw its own (found by tests/chaos: two chart-like replicas served nothing)."""
    env = {"SFTJOB_PEERING": "sftjob-operator"}
    drawn = {from_args([], env=env).priority for _ in range(20)}
    assert len(drawn) == 20 and min(drawn) > 0
    assert from_args(["--priority", "7"], env=env).priority == 7
    assert from_args([], env={**env, "SFTJOB_PRIORITY": "5"}).priority == 5


def test_configure_kopf() -> None:
    ks = kopf.OperatorSettings()
    configure(
        Settings(namespaces=("a",), finalizer="x.dev/f", watch_server_timeout=60, request_timeout=9),
        ks,
        InMemoryDiffBase(),
    )
    assert isinstance(ks.persistence.progress_storage, UnmarkedProgressStorage)
    assert isinstance(ks.persistence.diffbase_storage, InMemoryDiffBase)
    assert ks.persistence.finalizer == "x.dev/f"
    assert ks.persistence.consistency_timeout > kopf.OperatorSettings().persistence.consistency_timeout
    assert ks.watching.server_timeout == 60 and ks.networking.request_timeout == 9
    assert not ks.peering.clusterwide
    # API errors are retried for as long as the apiserver is away, every 5 s at most (tests/chaos)
    for _ in range(2):  # kopf iterates it afresh for every request
        assert list(itertools.islice(ks.networking.error_backoffs, 8)) == [1, 1, 2, 3, 5, 5, 5, 5]


def handled_at_once(storage: kopf.AnnotationsProgressStorage) -> kopf.Patch:
    """The patch kopf builds around a handler that succeeded on its first try: progress stored, then purged."""
    body, patch = kopf.Body({"metadata": {"uid": "u1", "name": "a"}}), kopf.Patch()
    record: Any = {"started": "2026-12-01T00:00:00", "stopped": "2026-12-01T00:00:01", "success": True}
    storage.store(key=cast(Any, "create"), record=record, body=body, patch=patch)
    storage.purge(key=cast(Any, "create"), body=body, patch=patch)
    return patch


def test_progress_storage_writes_nothing_for_a_handler_that_succeeds_at_once() -> None:
    # kopf's own storage leaves its marker behind: one metadata patch per SFTJob (the audit log counted it)
    assert handled_at_once(kopf.AnnotationsProgressStorage(prefix="sft.tuning.dev")) == {
        "metadata": {"annotations": {"sft.tuning.dev/kopf-managed": "yes"}}
    }
    assert not handled_at_once(UnmarkedProgressStorage(prefix="sft.tuning.dev"))
    # a failing handler's retry state is still written (kopf needs it to back off and count retries)
    body, patch = kopf.Body({"metadata": {"uid": "u1", "name": "a"}}), kopf.Patch()
    record: Any = {"started": "2026-12-01T00:00:00", "retries": 1, "delayed": "2026-12-01T00:00:06"}
    UnmarkedProgressStorage(prefix="sft.tuning.dev").store(
        key=cast(Any, "create"), record=record, body=body, patch=patch
    )
    assert list(patch["metadata"]["annotations"]) == ["sft.tuning.dev/create"]


def test_in_memory_diffbase_writes_nothing_and_tells_update_from_create() -> None:
    storage = InMemoryDiffBase(ignored_fields=["status"])
    body = kopf.Body(
        {
            "metadata": {"uid": "u1", "name": "a", "annotations": {"team": "x"}},
            "spec": {"suspend": False},
            "status": {"phase": "Training"},
        }
    )
    assert storage.fetch(body=body) is None  # never handled: kopf's create
    essence = storage.build(body=body)
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=essence)
    assert not patch  # no API write
    assert storage.fetch(body=body) == {
        "metadata": {"annotations": {"team": "x"}},
        "spec": {"suspend": False},
    }
    changed = kopf.Body({**body, "spec": {"suspend": True}, "status": {"phase": "Suspended"}})
    assert storage.fetch(body=changed) != storage.build(body=changed)  # kopf's update
    storage.forget("u1")
    assert storage.fetch(body=body) is None and len(storage) == 0


def test_instrumented_counts_errors() -> None:
    @instrumented("unit_test")
    def boom() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError):
        boom()
    assert (
        REGISTRY.get_sample_value("sftjob_operator_handler_invocations_total", {"handler": "unit_test"}) == 1
    )
    assert REGISTRY.get_sample_value("sftjob_operator_handler_errors_total", {"handler": "unit_test"}) == 1
    assert (
        REGISTRY.get_sample_value("sftjob_operator_handler_duration_seconds_count", {"handler": "unit_test"})
        == 1
    )
