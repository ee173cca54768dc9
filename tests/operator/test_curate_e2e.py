"""The curate stage on the real control plane (KWOK pods): with spec.dataset.curation the operator runs
`<name>-curate` alone, as phase Curating, and creates the train Job only once it has completed, so no GPU is
held while the data is curated; a failed curation ends the run before any train Job exists."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from conftest import Operator, apply, condition, events, jobs, pods, sftjob, status, wait_event, wait_phase
from kubernetes import client
from testbed.watch import Watcher

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CURATION = {"curation": {"nearDuplicates": {}}}


def transitions(kube: Any, ns: str, name: str) -> list[str]:
    return [e["message"].split(":")[0] for e in events(kube, ns, name) if "->" in e["message"]]


def succeeded_at(job: dict[str, Any]) -> str | None:
    """When the Job's pods were done: its SuccessCriteriaMet (or Complete) condition. Kubernetes 1.33+ sets
    SuccessCriteriaMet first, Complete once no pod is terminating; the operator moves on at the first."""
    conds = (job.get("status") or {}).get("conditions") or []
    done = [c for c in conds if c["type"] in ("SuccessCriteriaMet", "Complete") and c["status"] == "True"]
    return min((c["lastTransitionTime"] for c in done), default=None)


def complete(job: dict[str, Any]) -> bool:
    return succeeded_at(job) is not None


@contextlib.contextmanager
def job_history(kube: Any, ns: str) -> Iterator[list[tuple[str, str, bool]]]:
    """(event type, Job name, Complete?) for every watch event of the namespace's child Jobs, in the order
    the apiserver wrote them: a poll could miss the order of two writes a moment apart."""
    seen: list[tuple[str, str, bool]] = []
    lock = threading.Lock()

    def on_event(kind: str, obj: dict[str, Any]) -> None:
        with lock:
            seen.append((kind, obj["metadata"]["name"], complete(obj)))

    api = kube.api_client()
    w = Watcher(
        "jobs", api, client.BatchV1Api(api).list_namespaced_job, on_event,
        namespace=ns, label_selector="sft.tuning.dev/job-name",
    )  # fmt: skip
    w.start()
    try:
        yield seen
    finally:
        w.stop()
        w.join(30)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_curation_runs_alone_before_the_train_job(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube, ns = sftjob_crd, namespace
    with job_history(kube, ns) as seen:
        apply(kube, ns, sftjob("cur", delay="3s", dataset=CURATION))
        st = wait_phase(kube, ns, "cur", "Curating", 60, operator)
        assert st["reason"] == "CurateRunning"
        assert condition(st, "Curated")["status"] == "False"
        assert condition(st, "Curated")["reason"] == "CurateRunning"
        assert [j["metadata"]["name"] for j in jobs(kube, ns)] == ["cur-curate"]  # no train Job yet
        st = wait_phase(kube, ns, "cur", ("Succeeded", "Failed"), 120, operator)
        history = list(seen)
    assert st["phase"] == "Succeeded", st
    assert st["message"] == "curation, training, evaluation and merge completed"
    assert condition(st, "Curated")["status"] == "True"
    assert condition(st, "Curated")["reason"] == "CurationCompleted"

    # The curate Job: one pod, stage label curate, the curate command, no GPU (no perplexity filter).
    curate = kube.get_json("job", "cur-curate", "-n", ns)
    assert curate["metadata"]["labels"]["sft.tuning.dev/stage"] == "curate"
    assert curate["spec"]["completions"] == 1
    container = curate["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][3] == "curate"
    assert "nvidia.com/gpu" not in (container.get("resources") or {}).get("limits", {})
    (pod,) = pods(kube, ns, "sft.tuning.dev/stage=curate")
    limits = (pod["spec"]["containers"][0].get("resources") or {}).get("limits", {})
    assert "nvidia.com/gpu" not in limits, limits
    train = kube.get_json("job", "cur-train", "-n", ns)
    assert train["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    # The train Job was created only after the curate Job completed: in the watch's order of writes...
    first_train = next(i for i, (_, name, _) in enumerate(history) if name == "cur-train")
    assert any(name == "cur-curate" and done for _, name, done in history[:first_train]), history
    # ... and by the timestamps (one-second resolution)
    done = succeeded_at(curate)
    assert done is not None and ts(train["metadata"]["creationTimestamp"]) >= ts(done), curate["status"]

    names = sorted(j["metadata"]["name"] for j in jobs(kube, ns))
    assert names == ["cur-curate", "cur-eval", "cur-merge", "cur-train"]
    st = status(kube, ns, "cur")
    assert ts(condition(st, "Curated")["lastTransitionTime"]) <= ts(st["trainingStartTime"]), st
    text = operator.metrics()
    for before, after in (("", "Curating"), ("Curating", "Pending"), ("Pending", "Training")):
        assert (
            f'sftjob_operator_phase_transitions_total{{from_phase="{before}",to_phase="{after}"}} 1.0' in text
        )
    wait_event(kube, ns, "cur", "Succeeded")
    assert transitions(kube, ns, "cur") == ["Merging -> Succeeded"]  # Events: the end only


def test_failed_curation_fails_the_run_without_a_train_job(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    """The trainer's curate stage exits PERMANENT (2) with the reason as its termination message (a data
    gate here); the run ends Failed/CurationFailed with that text, and no train Job is ever created."""
    kube, ns = sftjob_crd, namespace
    why = "curation gate maxDropFraction: 0.42 of the input rows were dropped > 0.2"
    annotations = {
        "kwok.sftjob.dev/delay": "1s",
        "kwok.sftjob.dev/exit-code": "2",
        "kwok.sftjob.dev/message": why,
    }
    gate = {"curation": {"nearDuplicates": {}, "maxDropFraction": 0.2}}
    with job_history(kube, ns) as seen:
        apply(
            kube,
            ns,
            sftjob("badcur", dataset=gate, resources={"gpusPerNode": 1, "podAnnotations": annotations}),
        )
        st = wait_phase(kube, ns, "badcur", ("Failed", "Succeeded"), 90, operator)
        time.sleep(3)  # a train Job created late would show by now
        history = list(seen)
    assert (st["phase"], st["reason"]) == ("Failed", "CurationFailed"), st
    assert st["message"] == f"curation Job failed (PodFailurePolicy): {why}", st
    assert condition(st, "Curated")["status"] == "False"
    assert condition(st, "Curated")["reason"] == "CurationFailed"
    assert condition(st, "Failed")["status"] == "True"
    assert {name for _, name, _ in history} == {"badcur-curate"}, history
    assert [j["metadata"]["name"] for j in jobs(kube, ns)] == ["badcur-curate"]
    assert kube.get_json("job", "badcur-curate", "-n", ns)["status"].get("failed") == 1  # FailJob: no retry
    assert status(kube, ns, "badcur")["phase"] == "Failed"
    warnings = [e for e in wait_event(kube, ns, "badcur", "CurationFailed") if e["type"] == "Warning"]
    assert any(e["reason"] == "CurationFailed" and why in e["message"] for e in warnings), warnings
