"""Group recovery on the real control plane with KWOK nodes (docs/recovery.md): one rank's retryable
failure restarts every rank together and counts once; a permanent code on any rank fails at once; a
step counter that stops advancing is a stall, restarted like a failure; a node gone NotReady under a rank restarts
the group on other nodes (not counted) and keeps it off that node. Rank 0's progress comes from the
trainer's own metrics exporter served on the loopback address KWOK gave the pod."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Operator, apply, condition, sftjob, status, wait_event, wait_phase
from kubernetes import client
from testbed.procs import wait_until
from testbed.watch import Watcher

from sftjob_api import GROUP, PLURAL, VERSION
from sftjob_trainer.metrics import TrainerMetrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TWO_RANKS = {"nodes": 2, "gpusPerNode": 1}
NO_EVAL_MERGE = {"eval": {"enabled": False}, "merge": {"enabled": False}}


def train_pods(kube: Any, ns: str) -> list[dict[str, Any]]:
    return list(kube.get_json("pods", "-n", ns, "-l", "sft.tuning.dev/stage=train")["items"])


def running(kube: Any, ns: str, n: int) -> list[dict[str, Any]] | None:
    """The n Running, not terminating train pods (by completion index), once there are n."""
    live = [
        p
        for p in train_pods(kube, ns)
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]
    live.sort(key=lambda p: int(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]))
    return live if len(live) == n else None


def train_job_uid(kube: Any, ns: str, name: str) -> str | None:
    r = kube.kubectl("get", "job", f"{name}-train", "-n", ns, "-o", "jsonpath={.metadata.uid}", check=False)
    return r.stdout.strip() or None


def annotate(kube: Any, ns: str, pod: dict[str, Any], code: int) -> None:
    name = pod["metadata"]["name"]
    kube.kubectl(
        "annotate", "pod", name, "-n", ns, f"kwok.sftjob.dev/exit-code={code}", "kwok.sftjob.dev/delay=0s",
        "--overwrite",
    )  # fmt: skip


@contextlib.contextmanager
def rank0_exporter(
    pod: dict[str, Any], ns: str, name: str, port: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TrainerMetrics]:
    """The trainer's metrics exporter on the rank-0 pod's own (loopback) address."""
    ip = pod["status"]["podIP"]
    assert ip.startswith("127."), ip
    monkeypatch.setenv("SFTJOB_METRICS_ADDR", ip)
    tm = TrainerMetrics(ns, name, 0, port)
    try:
        yield tm
    finally:
        tm.server.shutdown()
        tm.server.server_close()


def test_one_rank_fails_retryably_whole_group_restarts_once(
    sftjob_crd: Any, namespace: str, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube, ns = sftjob_crd, namespace
    apply(kube, ns, sftjob("grp", delay="600s", resources=TWO_RANKS, **NO_EVAL_MERGE))
    wait_phase(kube, ns, "grp", "Training", 60, operator)
    pods0 = wait_until(lambda: running(kube, ns, 2), 60, "both ranks running")
    uid0 = train_job_uid(kube, ns, "grp")
    with rank0_exporter(pods0[0], ns, "grp", operator.trainer_metrics_port, monkeypatch) as tm:
        tm.step.set(57)
        tm.checkpoint_step.set(40)
        wait_until(
            lambda: (
                (status(kube, ns, "grp").get("artifacts") or {})
                .get("latestCheckpoint", "")
                .endswith("step-40/")
                and (status(kube, ns, "grp").get("progress") or {}).get("step") == 57
            ),
            30,
            "progress 57 and checkpoint 40 seen",
        )
        t0 = time.monotonic()
        annotate(kube, ns, pods0[1], 1)  # rank 1 crashes; rank 0 is still running
        old = {p["metadata"]["name"] for p in pods0}
        wait_until(
            lambda: not old & {p["metadata"]["name"] for p in train_pods(kube, ns)}, 60, "old group gone"
        )
        teardown = time.monotonic() - t0
    pods1 = wait_until(lambda: running(kube, ns, 2), 60, "restarted group running")
    restarted = time.monotonic() - t0
    assert train_job_uid(kube, ns, "grp") not in (None, uid0)  # a new Job attempt
    st = status(kube, ns, "grp")
    assert st["phase"] == "Training" and st["restarts"] == 1, st  # one failure of a 2-rank group: +1, not +2
    [rec] = st["recoveries"]
    assert rec["counted"] and "(rank 1) exit code 1" in rec["cause"], rec
    assert (rec["failedStep"], rec["resumedFromStep"], rec["stepsLost"]) == (57, 40, 17), rec
    wait_event(kube, ns, "grp", "TrainerRestarted")
    # the new group resumes from step 40: its first later step closes the recovery's downtime
    with rank0_exporter(pods1[0], ns, "grp", operator.trainer_metrics_port, monkeypatch) as tm:
        tm.step.set(41)
        rec = wait_until(
            lambda: next(iter(status(kube, ns, "grp")["recoveries"][-1:]), {}).get("downtimeSeconds") and
            status(kube, ns, "grp")["recoveries"][-1],
            30,
            "downtime recorded",
        )  # fmt: skip
    text = operator.metrics()
    assert 'sftjob_operator_recoveries_total{cause="Failed"} 1.0' in text, text
    assert "sftjob_operator_recovery_seconds_count 1.0" in text
    print(
        f"\nrank 1 exit 1: old group gone {teardown:.1f}s, new group running {restarted:.1f}s after the failure;"
        f" downtime (to the first step seen) {rec['downtimeSeconds']}s; steps lost {rec['stepsLost']}"
    )


def test_permanent_code_on_any_rank_fails_at_once(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube, ns = sftjob_crd, namespace
    apply(kube, ns, sftjob("perm2", delay="600s", resources=TWO_RANKS, **NO_EVAL_MERGE))
    wait_phase(kube, ns, "perm2", "Training", 60, operator)
    pods0 = wait_until(lambda: running(kube, ns, 2), 60, "both ranks running")
    annotate(kube, ns, pods0[1], 2)
    st = wait_phase(kube, ns, "perm2", ("Failed", "Succeeded"), 60, operator)
    assert (st["phase"], st["reason"]) == ("Failed", "TrainingFailed"), st
    assert st["restarts"] == 0 and not st.get("recoveries"), st


@contextlib.contextmanager
def stalled_conditions(kube: Any, ns: str) -> Iterator[list[tuple[float, dict[str, Any]]]]:
    """Every Stalled condition the namespace's SFTJobs carried, with the monotonic time the watch delivered
    it: the True state lasts only until the restarted group runs (under a second on KWOK), too short to poll."""
    seen: list[tuple[float, dict[str, Any]]] = []

    def on_event(_kind: str, obj: dict[str, Any]) -> None:
        cond = condition(obj.get("status") or {}, "Stalled")
        if cond and (not seen or seen[-1][1] != cond):
            seen.append((time.monotonic(), cond))

    api = kube.api_client()
    custom = client.CustomObjectsApi(api)
    w = Watcher(
        "sftjobs", api, custom.list_namespaced_custom_object, on_event,
        group=GROUP, version=VERSION, namespace=ns, plural=PLURAL,
    )  # fmt: skip
    w.start()
    try:
        yield seen
    finally:
        w.stop()
        w.join(30)


def test_stalled_step_counter_sets_stalled_then_restarts_the_group(
    sftjob_crd: Any, namespace: str, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube, ns = sftjob_crd, namespace
    policy = {"stallFactor": 3, "stallFloorSeconds": 10, "backoffLimit": 2}
    with stalled_conditions(kube, ns) as seen:
        apply(kube, ns, sftjob("stall", delay="600s", resources=TWO_RANKS, runPolicy=policy, **NO_EVAL_MERGE))
        wait_phase(kube, ns, "stall", "Training", 60, operator)
        pods0 = wait_until(lambda: running(kube, ns, 2), 60, "both ranks running")
        uid0 = train_job_uid(kube, ns, "stall")
        with rank0_exporter(pods0[0], ns, "stall", operator.trainer_metrics_port, monkeypatch) as tm:
            for step in range(1, 6):  # one step a second...
                tm.step.set(step)
                time.sleep(1.0)
            t0 = time.monotonic()  # ...then the counter stops (a hung collective; the exporter still answers)
            wait_until(
                lambda: train_job_uid(kube, ns, "stall") not in (None, uid0), 60, "train Job re-created"
            )
        st = wait_until(
            lambda: (
                (s := status(kube, ns, "stall")) and condition(s, "Stalled").get("status") == "False" and s
            ),
            60,
            "Stalled=False after the restart",
        )
    states = [c["status"] for _, c in seen]
    assert states == ["True", "False"], seen
    stalled_at, stalled = seen[0]
    stalled_after = stalled_at - t0
    assert stalled["message"].startswith("step 5 has not advanced for "), stalled
    assert stalled_after >= 9, stalled_after  # the floor (10 s), counted from when step 5 was first seen
    [rec] = st["recoveries"]
    assert rec["cause"].startswith("Stalled: step 5") and rec["counted"] and rec["failedStep"] == 5, rec
    assert st["restarts"] == 1 and st["phase"] == "Training", st
    assert 'sftjob_operator_recoveries_total{cause="Stalled"} 1.0' in operator.metrics()
    print(f"\nstall: Stalled=True {stalled_after:.1f}s after the last step (floor 10 s)")


@contextlib.contextmanager
def not_ready(kube: Any, node: str) -> Iterator[None]:
    """The node NotReady (kwok-stages.yaml leaves an annotated node so) until the block ends, then Ready."""
    kube.kubectl("annotate", "node", node, "kwok.sftjob.dev/not-ready=true", "--overwrite")
    patch = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "TestNotReady"}]}}
    try:
        kube.kubectl(
            "patch", "node", node, "--subresource=status", "--type=strategic", "-p", json.dumps(patch)
        )
        yield
    finally:
        kube.kubectl("annotate", "node", node, "kwok.sftjob.dev/not-ready-")
        kube.kubectl("wait", "--for=condition=Ready", f"node/{node}", "--timeout=60s")
        # the controller-manager lifts its not-ready taints once the node is Ready again
        wait_until(lambda: not kube.get_json("node", node)["spec"].get("taints"), 60, f"{node} untainted")


def test_node_not_ready_under_a_rank_restarts_the_group_elsewhere(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube, ns = sftjob_crd, namespace
    whole_nodes = {"nodes": 2, "gpusPerNode": 8}  # one rank fills a node: the restart must use another
    training = {"microBatchSize": 1, "globalBatchSize": 16}  # a multiple of the world size (16)
    job = sftjob("nodefail", delay="600s", resources=whole_nodes, training=training, **NO_EVAL_MERGE)
    apply(kube, ns, job)
    wait_phase(kube, ns, "nodefail", "Training", 60, operator)
    pods0 = wait_until(lambda: running(kube, ns, 2), 60, "both ranks running")
    bad = pods0[1]["spec"]["nodeName"]
    uid0 = train_job_uid(kube, ns, "nodefail")
    with not_ready(kube, bad):
        t0 = time.monotonic()
        pods1 = wait_until(
            lambda: train_job_uid(kube, ns, "nodefail") not in (None, uid0) and running(kube, ns, 2),
            90,
            "the group running again",
        )
        restarted = time.monotonic() - t0
        assert bad not in {p["spec"]["nodeName"] for p in pods1}, pods1
        job = kube.get_json("job", "nodefail-train", "-n", ns)
    terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [bad]}]}
    ], terms
    st = status(kube, ns, "nodefail")
    [rec] = st["recoveries"]
    assert rec["node"] == bad and not rec["counted"], rec
    assert rec["cause"].startswith(f"node {bad} NotReady (TestNotReady) under pod "), rec
    assert st["restarts"] == 0 and st["phase"] == "Training", st
    print(f"\nnode {bad} NotReady under rank 1: group running on other nodes {restarted:.1f}s later")
