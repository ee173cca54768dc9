"""A reconcile starts from this process's own last status write while the watch does not show it yet
(handlers/reconcile.Reconciler._newest): no write from a copy the operator itself made stale, no 409 + GET
(benchmarks/operator_scale.py counted one of each per transition before)."""

from __future__ import annotations

from typing import Any

from sftjob_operator.handlers.reconcile import Reconciler
from sftjob_operator.settings import Settings


def body(rv: str, phase: str) -> dict[str, Any]:
    return {
        "metadata": {"uid": "u1", "name": "a", "namespace": "ns", "resourceVersion": rv},
        "status": {"phase": phase},
    }


def test_own_write_wins_until_the_watch_moves_past_it() -> None:
    r = Reconciler(Settings(), kube=None)  # type: ignore[arg-type]  # _newest makes no API call
    assert r._newest(None) is None
    seen = body("10", "Pending")
    assert r._newest(seen) is seen  # nothing written yet
    written = body("11", "Training")
    r.memo("u1").own_write = ("10", written)
    assert r._newest(body("10", "Pending")) is written  # the watch still shows the copy our write replaced
    newer = body("12", "Training")
    assert r._newest(newer) is newer  # the watch moved on (ours or someone else's write): it wins
    assert r.memo("u1").own_write is None
    assert r._newest(body("10", "Pending"))["status"]["phase"] == "Pending"  # forgotten once superseded
