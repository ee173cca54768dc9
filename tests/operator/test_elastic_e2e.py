"""Elastic runs on the real control plane with KWOK GPU nodes (docs/recovery.md, "Elastic runs"): a node lost
with no spare re-forms the group at minNodes, and it finishes; capacity that returns grows it back at the
next checkpoint; once maxResizesPerHour is used up a due grow waits (Event ResizeHeld). The pool is made small by cordoning two of the bed's four nodes (restored afterwards); rank
0's progress and checkpoints come from the trainer's own metrics exporter on the pod's loopback address
(KWOK fakes the GPUs and the pods, nothing else)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Operator, apply, events, sftjob, status, wait_event, wait_phase
from test_recovery_e2e import annotate, not_ready, rank0_exporter, running, train_job_uid
from testbed.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# one rank fills a node (8 GPUs), so the group's size is the number of nodes it gets; a shrink, a grow and
# another shrink use up maxResizesPerHour
ELASTIC = {
    "resources": {"nodes": 2, "gpusPerNode": 8},
    "training": {"microBatchSize": 1, "globalBatchSize": 16},  # a multiple of 8 and of 16 ranks
    "runPolicy": {
        "elastic": {"minNodes": 1, "maxNodes": 2, "replacementTimeoutSeconds": 5, "maxResizesPerHour": 2}
    },
    "eval": {"enabled": False},
    "merge": {"enabled": False},
}


@contextlib.contextmanager
def cordoned(kube: Any, nodes: list[str]) -> Iterator[None]:
    for node in nodes:
        kube.kubectl("cordon", node)
    try:
        yield
    finally:
        for node in nodes:
            kube.kubectl("uncordon", node, check=False)


def ckpt(kube: Any, ns: str, step: int) -> str:
    """status.artifacts.latestCheckpoint of step `step`: under the run's own prefix, the SFTJob's uid."""
    uid = kube.kubectl("get", "sft", "el", "-n", ns, "-o", "jsonpath={.metadata.uid}").stdout
    return f"s3://artifacts/sft/{ns}/el/checkpoints/{uid}/step-{step}/"


def progress(st: dict[str, Any]) -> tuple[int | None, str]:
    return (st.get("progress") or {}).get("step"), (st.get("artifacts") or {}).get("latestCheckpoint", "")


def test_lost_node_shrinks_to_min_nodes_grows_back_within_the_resize_budget_and_finishes(
    sftjob_crd: Any, namespace: str, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube, ns, port = sftjob_crd, namespace, operator.trainer_metrics_port
    spare = kube.nodes[:2]  # cordoned: the run gets the other two, and no spare
    with cordoned(kube, spare):
        apply(kube, ns, sftjob("el", delay="600s", **ELASTIC))
        pods0 = wait_until(lambda: running(kube, ns, 2), 60, "both ranks running")
        assert status(kube, ns, "el")["nodes"] == 2
        lost = pods0[1]["spec"]["nodeName"]
        with rank0_exporter(pods0[0], ns, "el", port, monkeypatch) as tm:
            tm.step.set(12)
            tm.checkpoint_step.set(10)
            wait_until(
                lambda: progress(status(kube, ns, "el")) == (12, ckpt(kube, ns, 10)), 30, "step 12 seen"
            )
            t0 = time.monotonic()
            # the node's loss restarts the group (not counted); its second rank has nowhere to go, so after
            # replacementTimeoutSeconds the group re-forms at one node
            with not_ready(kube, lost):
                one = wait_until(
                    lambda: status(kube, ns, "el").get("nodes") == 1 and running(kube, ns, 1), 90, "1 node"
                )
                shrunk = time.monotonic() - t0
        st = status(kube, ns, "el")
        lost_rec, resized = st["recoveries"][-2:]
        assert lost_rec["node"] == lost and not lost_rec["counted"], lost_rec
        assert (resized["fromWorldSize"], resized["toWorldSize"], resized["counted"]) == (16, 8, False)
        assert resized["cause"].startswith("Resized: 2 -> 1 node(s) (world size 16 -> 8): 1 of 2 rank(s)")
        assert st["worldSize"] == 8 and st["restarts"] == 0, st
        job = kube.get_json("job", "el-train", "-n", ns)
        assert job["spec"]["completions"] == 1 and "--nnodes=1" in job["spec"]["template"]["spec"][
            "containers"][0]["command"]  # fmt: skip
        table = kube.kubectl("get", "sft", "el", "-n", ns).stdout
        assert table.split("\n")[0].split()[:6] == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "NODES"], (
            table
        )
        wait_event(kube, ns, "el", "GroupResized")

        # capacity returns: the probe finds a node, the group grows back at the next checkpoint
        with rank0_exporter(one[0], ns, "el", port, monkeypatch) as tm:
            tm.step.set(11)
            tm.checkpoint_step.set(10)
            wait_until(lambda: progress(status(kube, ns, "el"))[0] == 11, 30, "the shrunk group's step seen")
            kube.kubectl("uncordon", spare[0])
            wait_until(lambda: probe_scheduled(kube, ns), 60, "the capacity probe scheduled")
            uid1 = train_job_uid(kube, ns, "el")
            t1 = time.monotonic()
            tm.step.set(16)
            tm.checkpoint_step.set(15)  # the next checkpoint
            two = wait_until(
                lambda: train_job_uid(kube, ns, "el") not in (None, uid1) and running(kube, ns, 2),
                90,
                "2 nodes",
            )
            grown = time.monotonic() - t1
        st = status(kube, ns, "el")
        grew = st["recoveries"][-1]
        assert (grew["fromWorldSize"], grew["toWorldSize"], grew["resumedFromStep"]) == (8, 16, 15), grew
        assert "after the checkpoint of step 15" in grew["cause"], grew
        assert st["nodes"] == 2 and lost not in {p["spec"]["nodeName"] for p in two}
        wait_until(lambda: not probe_jobs(kube, ns), 30, "probe gone")  # at its most nodes: no probe
        resizes = [e for e in events(kube, ns, "el") if e["reason"] == "GroupResized"]
        assert [e["type"] for e in resizes][-2:] == ["Warning", "Normal"], resizes

        # bounded: maxResizesPerHour 2 is used up. Losing the new node still shrinks the group (that keeps
        # the run going), but when capacity returns once more the grow waits, and says so.
        with rank0_exporter(two[0], ns, "el", port, monkeypatch) as tm:
            tm.step.set(17)
            tm.checkpoint_step.set(15)
            wait_until(lambda: progress(status(kube, ns, "el"))[0] == 17, 30, "the grown group's step seen")
            with not_ready(kube, spare[0]):
                one = wait_until(
                    lambda: status(kube, ns, "el").get("nodes") == 1 and running(kube, ns, 1),
                    90,
                    "1 node again",
                )
        with rank0_exporter(one[0], ns, "el", port, monkeypatch) as tm:
            tm.step.set(16)
            tm.checkpoint_step.set(15)
            wait_until(lambda: progress(status(kube, ns, "el"))[0] == 16, 30, "the shrunk group's step seen")
            kube.kubectl("uncordon", spare[1])
            wait_until(lambda: probe_scheduled(kube, ns), 60, "the capacity probe scheduled")
            tm.step.set(21)
            tm.checkpoint_step.set(20)
            [held] = [e for e in wait_event(kube, ns, "el", "ResizeHeld") if e["reason"] == "ResizeHeld"]
    assert held["message"].endswith("3 resizes in the last hour, runPolicy.elastic.maxResizesPerHour is 2"), (
        held
    )
    st = status(kube, ns, "el")
    assert st["nodes"] == 1 and len([r for r in st["recoveries"] if "toWorldSize" in r]) == 3, st
    text = operator.metrics()
    assert 'sftjob_operator_recoveries_total{cause="Resized"} 3.0' in text, text

    annotate(kube, ns, one[0], 0)  # the group at minNodes finishes
    st = wait_phase(kube, ns, "el", ("Succeeded", "Failed"), 60, operator)
    assert st["phase"] == "Succeeded" and st["nodes"] == 1, st
    print(
        f"\nelastic: node lost -> running at 1 node {shrunk:.1f}s; checkpoint -> running at 2 nodes {grown:.1f}s"
    )


def probe_jobs(kube: Any, ns: str) -> list[Any]:
    return list(kube.get_json("jobs", "-n", ns, "-l", "sft.tuning.dev/stage=probe")["items"])


def probe_scheduled(kube: Any, ns: str) -> bool:
    pods = kube.get_json("pods", "-n", ns, "-l", "sft.tuning.dev/stage=probe")["items"]
    return any(p["spec"].get("nodeName") for p in pods)


def test_nodes_edited_while_suspended_re_form_the_group_at_the_new_size(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    """resources.nodes is editable: a suspended run resumes at the new size (any run, elastic or not)."""
    kube, ns = sftjob_crd, namespace
    two = {"nodes": 2, "gpusPerNode": 1}
    apply(
        kube,
        ns,
        sftjob("resz", delay="600s", resources=two, eval={"enabled": False}, merge={"enabled": False}),
    )
    wait_until(lambda: running(kube, ns, 2), 60, "both ranks running")
    uid0 = train_job_uid(kube, ns, "resz")
    patch = '{"spec":{"suspend":true}}'
    kube.kubectl("patch", "sftjob", "resz", "-n", ns, "--type=merge", "-p", patch)
    wait_phase(kube, ns, "resz", "Suspended", 60, operator)
    kube.kubectl(
        "patch", "sftjob", "resz", "-n", ns, "--type=merge", "-p", '{"spec":{"resources":{"nodes":1}}}'
    )
    job = wait_until(
        lambda: (
            train_job_uid(kube, ns, "resz") not in (None, uid0)
            and kube.get_json("job", "resz-train", "-n", ns)
        ),
        60,
        "the train Job re-created",
    )
    assert job["spec"]["completions"] == 1 and job["spec"]["suspend"] is True, job["spec"]
    kube.kubectl("patch", "sftjob", "resz", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_until(lambda: running(kube, ns, 1), 60, "one rank running")
    st = status(kube, ns, "resz")
    rec = st["recoveries"][-1]
    assert rec["cause"] == (
        "Resized: 2 -> 1 node(s) (world size 2 -> 1): resources.nodes changed while the group was not running"
    ), rec
    assert (rec["fromWorldSize"], rec["toWorldSize"], st["nodes"], st["restarts"]) == (2, 1, 1, 0), st
