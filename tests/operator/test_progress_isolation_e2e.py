"""One SFTJob's trainer port cannot stall the operator (issue 25, item 3): rank 0's /metrics answers one
byte at a time, forever, on the pod's own (loopback) IP, and the operator — with a single reconcile worker,
so one blocked thread would stop everything — still runs another SFTJob and that SFTJob itself to the end."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from conftest import Operator, apply, sftjob, wait_phase
from testbed.procs import wait_until
from testbed.tcp import TcpServer, trickle

pytestmark = pytest.mark.e2e

NO_EVAL = {"eval": {"enabled": False}, "merge": {"enabled": False}}


def rank0_ip(kube: Any, namespace: str, name: str) -> str | None:
    items = kube.get_json(
        "pods",
        "-n",
        namespace,
        "-l",
        f"sft.tuning.dev/job-name={name},sft.tuning.dev/stage=train,batch.kubernetes.io/job-completion-index=0",
    )["items"]
    return next((p["status"].get("podIP") for p in items if p["status"].get("phase") == "Running"), None)


def read_errors(op: Operator) -> float:
    m = re.search(r'^sftjob_operator_progress_reads_total\{result="error"\} (\S+)$', op.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.timeout(60)
def test_a_trickling_trainer_port_stalls_neither_other_sftjobs_nor_its_own(
    sftjob_crd: Any, namespace: str, start_operator: Any
) -> None:
    # ~25 s: A trains 12 s (KWOK delay); B is created once the operator is reading A's trickling port.
    kube = sftjob_crd
    op = start_operator("--workers", "1", "--progress-timeout", "2")
    apply(kube, namespace, sftjob("slow-port", delay="12s", **NO_EVAL))
    wait_phase(kube, namespace, "slow-port", "Training", 30, op)
    ip = wait_until(lambda: rank0_ip(kube, namespace, "slow-port"), 30, "rank-0 pod IP")
    assert ip.startswith("127."), ip  # the test bed keeps pod IPs on loopback

    stop = threading.Event()
    # one byte every 0.5 s: under the 2 s deadline per socket read, so only an overall deadline ends a read
    srv = TcpServer(trickle(stop, 0.5), host=ip, port=op.trainer_metrics_port)
    try:
        wait_until(lambda: srv.connections >= 1, 20, "the operator reading the trickling port")
        apply(kube, namespace, sftjob("other", delay="1s", **NO_EVAL))
        # With the read on the reconcile thread (and under A's lock) neither gets here: B is never
        # reconciled, A never sees its train Job finish.
        wait_phase(kube, namespace, "other", "Succeeded", 30, op)
        wait_phase(kube, namespace, "slow-port", "Succeeded", 30, op)
        assert read_errors(op) >= 1  # reads of the trickling port ended (at the deadline), counted
        assert srv.connections >= 2  # and each tick tried again: nothing stayed stuck on the first read
        assert op.healthy()
    finally:
        stop.set()
        srv.close()
