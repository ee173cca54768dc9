"""Kueue for real (docs/kueue.md): Kueue's own controller (tests/testbed/kueue.py, built from
sigs.k8s.io/kueue) admits the operator's child Jobs against a ClusterQueue of 16 GPUs on the KWOK nodes.
Four SFTJobs of 8 GPUs each (2 ranks x 4 GPUs) run two at a time, the others are admitted as the first
finish, and every stage is admitted as a whole gang (a training group never runs partially). Suspending a
queued SFTJob deactivates its Workload, so Kueue itself stops the Job and releases the quota."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Operator, apply, events, sftjob, status, wait_phase
from testbed.kueue import Kueue
from testbed.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

QUOTA_GPUS = 16
GANG = {"nodes": 2, "gpusPerNode": 4}  # 8 GPUs, two pods that must start together
TRAINING = {"microBatchSize": 1, "globalBatchSize": 16}  # a multiple of the world size (8)
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture(scope="module")
def kueue(kube: Any, tmp_path_factory: pytest.TempPathFactory, testbed_logs: Path) -> Iterator[Kueue]:
    k = Kueue(kube, tmp_path_factory.mktemp("kueue"), testbed_logs)
    try:
        yield k.start()
    finally:
        k.stop()


@contextlib.contextmanager
def cluster_queue(kube: Any, ns: str, gpus: int) -> Iterator[str]:
    """A ResourceFlavor + ClusterQueue (cluster-scoped, named after the namespace) and a LocalQueue `team`."""
    name = ns[:63]
    objs = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": name}},
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "queueingStrategy": "BestEffortFIFO",
                "resourceGroups": [
                    {
                        "coveredResources": ["nvidia.com/gpu"],
                        "flavors": [
                            {"name": name, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}]}
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "team", "namespace": ns},
            "spec": {"clusterQueue": name},
        },
    ]
    apply(kube, ns, *objs)
    try:
        yield "team"
    finally:
        for kind in ("clusterqueue", "resourceflavor"):
            kube.kubectl("delete", kind, name, "--wait=false", check=False)


def queued(name: str, queue: str, delay: str) -> dict[str, Any]:
    job = sftjob(name, delay=delay, resources=GANG, training=TRAINING, merge={"enabled": False})
    job["metadata"]["labels"] = {QUEUE_LABEL: queue}
    return job


def admitted(wl: dict[str, Any]) -> bool:
    conds = (wl.get("status") or {}).get("conditions") or []
    on = {c["type"] for c in conds if c.get("status") == "True"}
    return "QuotaReserved" in on and "Finished" not in on


def finished(wl: dict[str, Any]) -> bool:
    conds = (wl.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Finished" and c.get("status") == "True" for c in conds)


def workload_gpus(wl: dict[str, Any]) -> int:
    """GPUs the Workload holds: its admission's per-pod-set usage."""
    total = 0
    for psa in ((wl.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []:
        total += int((psa.get("resourceUsage") or {}).get("nvidia.com/gpu", "0"))
    return total


def owner_job(wl: dict[str, Any]) -> str:
    return next(o["name"] for o in wl["metadata"].get("ownerReferences") or [] if o["kind"] == "Job")


def job_span(job: dict[str, Any]) -> tuple[str, str]:
    """(startTime, completionTime) of a finished Job: RFC 3339 UTC seconds, so they order as strings."""
    st = job.get("status") or {}
    return st["startTime"], st["completionTime"]


def max_overlap(spans: list[tuple[str, str]]) -> int:
    """The most spans [start, end) running at one instant (an end and a start at the same second: no overlap)."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_four_8_gpu_sftjobs_run_two_at_a_time_each_stage_a_whole_gang(
    sftjob_crd: Any, namespace: str, operator: Operator, kueue: Kueue
) -> None:
    kube, ns = sftjob_crd, namespace
    names = [f"q{i}" for i in range(4)]
    with cluster_queue(kube, ns, QUOTA_GPUS) as queue:
        for name in names:
            apply(kube, ns, queued(name, queue, delay="8s"))
        peak_training: set[str] = set()
        max_gpus = 0
        admitted_trains: list[str] = []  # in the order first seen admitted
        finished_then: dict[str, set[str]] = {}  # train Workloads Finished when each was first seen admitted
        queued_seen: set[str] = set()  # SFTJobs seen Pending/Queued (their train Job waiting for quota)
        polls = 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            polls += 1
            # pods first: a train pod Running now means its Workload is admitted now, so still admitted
            # (or Finished) when the Workloads are read just after
            pods = kube.get_json("pods", "-n", ns, "-l", "sft.tuning.dev/stage=train")["items"]
            wls = kube.get_json("workloads.kueue.x-k8s.io", "-n", ns)["items"]
            live = [w for w in wls if admitted(w)]
            gpus = sum(workload_gpus(w) for w in live)
            max_gpus = max(max_gpus, gpus)
            assert gpus <= QUOTA_GPUS, [(owner_job(w), workload_gpus(w)) for w in live]
            trains = {owner_job(w) for w in live if owner_job(w).endswith("-train")}
            for w in live:
                if owner_job(w).endswith("-train"):
                    psas = w["status"]["admission"]["podSetAssignments"]
                    # the whole gang: both ranks' pods, 2 x 4 GPUs, in one admission
                    assert [p.get("count") for p in psas] == [2] and workload_gpus(w) == 8, psas
            done = {owner_job(w) for w in wls if finished(w)}
            for t in sorted(trains):
                if t not in admitted_trains:
                    admitted_trains.append(t)
                    finished_then[t] = {d for d in done if d.endswith("-train")}
            if len(trains) > len(peak_training):
                peak_training = trains
            # no rank runs without its whole group's admission (the pods of an admitted gang start one
            # by one on KWOK, so 1 of 2 Running is a start-up moment, not a partial admission)
            for name in names:
                running = [
                    p["metadata"]["name"]
                    for p in pods
                    if p["metadata"]["labels"].get("sft.tuning.dev/job-name") == name
                    and p["status"].get("phase") == "Running"
                ]
                assert len(running) <= 2, running
                if running:
                    assert f"{name}-train" in trains | done, (running, trains, done)
            sts = {n: status(kube, ns, n) for n in names}
            queued_seen |= {
                n for n, s in sts.items() if (s.get("phase"), s.get("reason")) == ("Pending", "Queued")
            }
            phases = {n: s.get("phase") for n, s in sts.items()}
            if all(p in ("Succeeded", "Failed") for p in phases.values()):
                break
        assert all(p == "Succeeded" for p in phases.values()), phases
        train = kube.get_json("job", "q3-train", "-n", ns)  # created suspended and labelled for Kueue
        assert train["metadata"]["labels"][QUEUE_LABEL] == queue
        assert train["spec"]["template"]["metadata"]["labels"][QUEUE_LABEL] == queue
        # Two at a time, never three, from the train Jobs' own record (the Job controller sets startTime when
        # Kueue unsuspends a Job, completionTime when it completes): a poll that takes longer than two
        # gangs overlap for (seen under load) cannot miss it. A start in the second another ends is not an
        # overlap: Kueue admits the next gang only once a finished one's quota is back.
        spans = [job_span(kube.get_json("job", f"{n}-train", "-n", ns)) for n in names]
    assert max_overlap(spans) == 2, spans
    assert len(peak_training) <= 2, peak_training  # what the polls saw agrees: never three
    # The other two waited (Pending/Queued) and were admitted only once a first gang had finished. Which two
    # go first is Kueue's choice: BestEffortFIFO orders by creation time, but the four are created within
    # the same second and an inadmissible head does not block the queue (a run saw q0, q1, q3, q2).
    first, later = admitted_trains[:2], admitted_trains[2:]
    assert sorted(admitted_trains) == [f"{n}-train" for n in names], admitted_trains
    for t in later:
        assert finished_then[t] & set(first), (t, finished_then[t], first)
    assert {t.removesuffix("-train") for t in later} <= queued_seen, (later, queued_seen)
    print(f"\nkueue: 4 SFTJobs x 8 GPUs on a 16-GPU queue: peak {max_overlap(spans)} training at once,"
          f" max {max_gpus} GPUs admitted, {polls} polls")  # fmt: skip


def test_suspend_of_a_queued_sftjob_goes_through_kueue(
    sftjob_crd: Any, namespace: str, operator: Operator, kueue: Kueue
) -> None:
    kube, ns = sftjob_crd, namespace
    with cluster_queue(kube, ns, QUOTA_GPUS) as queue:
        apply(kube, ns, queued("susp", queue, delay="600s"))
        wait_phase(kube, ns, "susp", "Training", 90, operator)

        def train_workload() -> dict[str, Any] | None:
            wls = kube.get_json("workloads.kueue.x-k8s.io", "-n", ns)["items"]
            return next((w for w in wls if owner_job(w) == "susp-train"), None)

        assert admitted(wait_until(train_workload, 30, "train Workload"))
        kube.kubectl("patch", "sftjob", "susp", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
        wait_phase(kube, ns, "susp", "Suspended", 90, operator)
        wl = train_workload()
        assert wl is not None and wl["spec"]["active"] is False, wl
        assert not admitted(wl), wl["status"]  # Kueue evicted it: the quota is free
        evicted = next(c for c in wl["status"]["conditions"] if c["type"] == "Evicted")
        assert evicted["status"] == "True" and evicted["reason"] == "Deactivated", evicted
        job = kube.get_json("job", "susp-train", "-n", ns)
        assert job["spec"]["suspend"] is True  # by Kueue, which keeps it so while the Workload is inactive
        time.sleep(3)  # Kueue would have unsuspended an admitted Job by now
        assert kube.get_json("job", "susp-train", "-n", ns)["spec"]["suspend"] is True
        kube.kubectl("patch", "sftjob", "susp", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
        wait_phase(kube, ns, "susp", "Training", 90, operator)
        wl = train_workload()
        assert wl is not None and wl["spec"]["active"] is True and admitted(wl), wl


def test_a_curated_run_queues_its_curate_job_like_every_stage(
    sftjob_crd: Any, namespace: str, operator: Operator, kueue: Kueue
) -> None:
    """The curate Job (no GPU) is created suspended with the queue label and admitted as a Workload of its
    own; the train gang is queued only after it, once curation is done."""
    kube, ns = sftjob_crd, namespace
    with cluster_queue(kube, ns, QUOTA_GPUS) as queue:
        job = queued("qcur", queue, delay="2s")
        job["spec"]["dataset"]["curation"] = {"nearDuplicates": {}}
        apply(kube, ns, job)
        st = wait_phase(kube, ns, "qcur", ("Succeeded", "Failed"), 120, operator)
        assert st["phase"] == "Succeeded", st
        curate = kube.get_json("job", "qcur-curate", "-n", ns)
        assert curate["metadata"]["labels"][QUEUE_LABEL] == queue
        wls = {owner_job(w): w for w in kube.get_json("workloads.kueue.x-k8s.io", "-n", ns)["items"]}
        assert {"qcur-curate", "qcur-train", "qcur-eval"} <= set(wls), sorted(wls)
        assert finished(wls["qcur-curate"]) and workload_gpus(wls["qcur-curate"]) == 0
        assert wls["qcur-train"]["metadata"]["creationTimestamp"] >= curate["status"]["startTime"]
    text = operator.metrics()
    for before, after in (("", "Curating"), ("Curating", "Pending")):
        assert f'sftjob_operator_phase_transitions_total{{from_phase="{before}",to_phase="{after}"}}' in text


def test_an_elastic_run_starts_at_the_size_the_queue_has_room_for(
    sftjob_crd: Any, namespace: str, operator: Operator, kueue: Kueue
) -> None:
    """Partial admission (docs/kueue.md): an elastic run of at most 4 nodes x 4 GPUs (minNodes 2) on a queue
    of 8 GPUs is admitted by Kueue at 2 pods, runs as one group of 2 (parallelism = completions = 2, no
    waves) and finishes. The operator gave each pod the size (annotation sft.tuning.dev/nnodes) and removed
    its scheduling gate. KWOK pods run no container, so the last link, the pod's env SFTJOB_NNODES (torchrun's
    --nnodes) read from that annotation through the downward API, is the kubelet's documented behaviour
    (it resolves a container's env when it creates the container: kubelet_pods.go makeEnvironmentVariables),
    not exercised here; the unit tests pin the rendered env and command (tests/unit/test_kueue_admission.py)."""
    kube, ns = sftjob_crd, namespace
    with cluster_queue(kube, ns, 8) as queue:
        job = sftjob("part", delay="2s", resources={"nodes": 4, "gpusPerNode": 4},
                     training={"microBatchSize": 1, "globalBatchSize": 32},  # 2 or 4 nodes (8, 16 ranks)
                     runPolicy={"elastic": {"minNodes": 2, "maxNodes": 4}},
                     eval={"enabled": False}, merge={"enabled": False})  # fmt: skip
        job["metadata"]["labels"] = {QUEUE_LABEL: queue}
        apply(kube, ns, job)
        st = wait_phase(kube, ns, "part", ("Succeeded", "Failed"), 90, operator)
        assert st["phase"] == "Succeeded", st
        assert (st["nodes"], st["worldSize"]) == (2, 8) and not st.get("recoveries"), st
        wl = next(w for w in kube.get_json("workloads.kueue.x-k8s.io", "-n", ns)["items"]
                  if owner_job(w) == "part-train")  # fmt: skip
        psas = wl["status"]["admission"]["podSetAssignments"]
        assert [p.get("count") for p in psas] == [2] and workload_gpus(wl) == 8, psas
        train = kube.get_json("job", "part-train", "-n", ns)
        assert (train["spec"]["parallelism"], train["spec"]["completions"]) == (2, 2), train["spec"]
        assert train["metadata"]["labels"]["sft.tuning.dev/nodes"] == "2"
        assert train["status"]["succeeded"] == 2
        pods = kube.get_json("pods", "-n", ns, "-l", "sft.tuning.dev/stage=train")["items"]
        assert len(pods) == 2, [p["metadata"]["name"] for p in pods]  # one group of two, never a second wave
        for pod in pods:
            assert pod["metadata"]["annotations"]["sft.tuning.dev/nnodes"] == "2", pod["metadata"]
            assert not pod["spec"].get("schedulingGates"), pod["spec"]
        [admitted_event] = [e for e in events(kube, ns, "part") if e["reason"] == "GroupAdmitted"]
        assert "Kueue admitted 2 pod(s): the training group starts at 2 node(s)" in admitted_event["message"]
