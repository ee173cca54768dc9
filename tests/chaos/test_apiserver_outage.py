"""apiserver faults (issue 14, part 2): kube-apiserver SIGKILLed mid-run and kept away 30 s, then started
again on the same etcd. The operator must keep running (the same process, no crash loop), resume its watches
by itself, and every SFTJob must still end as expected (the same lifecycle mix and checks as the operator
chaos suite). Figures: docs/reliability.md.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import pytest

from .campaign import Campaign
from .conftest import FULL, count
from .faults import ApiserverOutage
from .operator_fixtures import Operator
from .test_operator_chaos import assert_clean

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(3600 if FULL else 900)]


def first_reconcile_after(log: str, when: datetime | None) -> float | None:
    """Seconds from `when` to the operator's first reconcile log line (a create or a transition) after it."""
    for stamp in re.findall(r"^(\S+ \S+) INFO sftjob_operator\.reconcile:", log, re.M):
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
        if when is not None and at >= when:
            return round((at - when).total_seconds(), 1)
    return None


def test_apiserver_away_30s_mid_run(sftjob_crd: Any, namespace: str, watches: Any, report: Any) -> None:
    kube = sftjob_crd
    op = Operator(kube, namespace).start()
    pid = op.proc.pid
    n = count(12, 60)
    # Few at a time, so that lifecycles start before, during (refused, retried) and after the outage; the
    # last quarter only after it (on a fast machine all of them had been submitted before it began).
    campaign = Campaign(kube, namespace, watches.recorder, n, max_inflight=6, after_fault=n // 4)
    outage = ApiserverOutage(kube, after_s=15, down_s=30)
    try:
        t0 = time.monotonic()
        t_end = campaign.run(deadline_s=300 + 10 * n, fault=outage)
        # judged before the operator stops: stopping deletes the SFTJobs (and bumps their generation)
        figures = campaign.figures(settled_s=t_end - (campaign.fault_free_after or t_end))
        alive, healthy = op.proc.alive() and op.proc.pid == pid, op.healthy()
        log = op.proc.log_path.read_text(errors="replace")
    finally:
        op.stop()
    back = outage.last_end
    after = [t for t in watches.recorder.status_changes if t > back]
    submitted_after = sum(1 for lc in campaign.lifecycles if lc.submitted > back)
    figures.update(
        outage=outage.done,
        operator_same_process_alive=alive,
        operator_healthy_after=healthy,
        operator_starts=op.starts,
        operator_first_reconcile_after_outage_s=first_reconcile_after(log, outage.ended_at),
        lifecycles_submitted_after_outage=submitted_after,
        operator_log_tracebacks=log.count("Traceback"),
        wall_s=round(t_end - t0, 1),
        watch_reconnects=watches.errors,
    )
    report(figures)
    assert outage.done, figures
    assert alive and healthy and op.starts == 1, figures
    assert after and submitted_after > 0, figures  # the operator's watches carried on by themselves
    assert_clean(figures)
