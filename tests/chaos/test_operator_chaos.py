"""Operator chaos (issue 14, part 1): a mix of SFTJob lifecycles with known outcomes on the real control plane
with KWOK GPU nodes, while the operator is SIGKILLed every ~10 s and restarted — one replica, and separately
two replicas with kopf peering whose active one is killed. Figures: docs/reliability.md.

Checked from real watches (tests/chaos/watch.py): no child created twice, no SFTJob stuck, every end as
expected, observedGeneration and phase never going backwards; the operator never dies on its own and every
restart becomes healthy. Time to settle is reported, never asserted.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from .campaign import Campaign
from .conftest import FULL, count
from .faults import KillLoop, active_replica, peering_priority
from .operator_fixtures import Operator, create_peering

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(3600 if FULL else 900)]


def assert_clean(figures: dict[str, Any]) -> None:
    assert figures["duplicate_children"] == {}, figures
    assert figures["stuck"] == {}, figures
    assert figures["wrong_outcome"] == {}, figures
    assert figures["regressions"] == {}, figures
    assert figures["correct"] + len(figures["fault_not_injected"]) == figures["lifecycles"], figures


def run_campaign(kube: Any, namespace: str, watches: Any, killer: KillLoop, n: int) -> dict[str, Any]:
    campaign = Campaign(kube, namespace, watches.recorder, n)
    t0 = time.monotonic()
    t_end = campaign.run(deadline_s=300 + 10 * n, fault=killer)
    figures = campaign.figures(settled_s=t_end - (campaign.fault_free_after or t_end))
    figures.update(killer.figures(), wall_s=round(t_end - t0, 1), watch_reconnects=watches.errors)
    return figures


def test_operator_sigkilled_every_10s(sftjob_crd: Any, namespace: str, watches: Any, report: Any) -> None:
    op = Operator(sftjob_crd, namespace).start()
    try:
        killer = KillLoop(lambda: op, every_s=10.0, seed=14)
        figures = run_campaign(sftjob_crd, namespace, watches, killer, count(12, 200))
    finally:
        op.stop()
    report(figures)
    assert figures["kills"] > 0 and not figures["restarts_not_healthy"], figures
    assert not figures["operator_died_on_its_own"], figures
    assert_clean(figures)


def test_two_peered_replicas_active_one_killed(
    sftjob_crd: Any, namespace: str, watches: Any, report: Any
) -> None:
    """Both replicas start alike, as the Helm chart starts them (same peering name, no --priority)."""
    kube = sftjob_crd
    create_peering(kube, namespace)
    replicas = [
        Operator(kube, namespace, "--peering-name", "sftjob-operator", name=f"replica{i}-{namespace}").start()
        for i in range(2)
    ]
    try:
        killer = KillLoop(lambda: active_replica(replicas), every_s=20.0, seed=15)
        figures = run_campaign(kube, namespace, watches, killer, count(6, 60))
        figures["priorities"] = [peering_priority(op) for op in replicas]
    finally:
        for op in replicas:
            op.stop()
    report(figures)
    assert figures["kills"] > 0 and not figures["restarts_not_healthy"], figures
    assert not figures["operator_died_on_its_own"], figures
    assert_clean(figures)
