"""The operator on the real control plane (kube-apiserver, controller-manager with the Job and garbage
collector controllers, scheduler) with KWOK GPU nodes running the pods. See docs/operator.md."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from conftest import (
    Operator,
    apply,
    condition,
    events,
    get,
    jobs,
    pods,
    sftjob,
    status,
    timed,
    wait_event,
    wait_phase,
)
from pod_files import trainer_config_file
from testbed.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def transition_messages(kube: Any, ns: str, name: str) -> list[str]:
    return [e["message"].split(":")[0] for e in events(kube, ns, name) if "->" in e["message"]]


def test_happy_path_train_eval_merge_succeeded(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    done = timed("happy path")
    apply(kube, namespace, sftjob("happy", delay="2s"))
    wait_phase(kube, namespace, "happy", "Training", 60, operator)

    # Children: the indexed train Job, owned by the SFTJob; one pod needs no Service and the trainer config
    # travels in the pod template (no ConfigMap).
    owner = get(kube, namespace, "happy")["metadata"]["uid"]
    train = kube.get_json("job", "happy-train", "-n", namespace)
    assert train["spec"]["completionMode"] == "Indexed"
    assert train["spec"]["completions"] == train["spec"]["parallelism"] == 1
    assert train["metadata"]["ownerReferences"][0]["uid"] == owner
    assert train["metadata"]["labels"]["sft.tuning.dev/stage"] == "train"
    assert train["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    tmpl = train["spec"]["template"]
    assert tmpl["metadata"]["annotations"]["kwok.sftjob.dev/delay"] == "2s"
    assert tmpl["spec"]["containers"][0]["command"][:4] == ["python", "-m", "sftjob_trainer", "launch"]
    assert tmpl["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert json.loads(trainer_config_file(train))["run"]["name"] == "happy"  # as the API server stored it
    for kind in ("services", "configmaps"):
        assert not kube.get_json(kind, "-n", namespace, "-l", "sft.tuning.dev/job-name")["items"]
    (pod,) = pods(kube, namespace, "sft.tuning.dev/stage=train")
    assert pod["spec"]["hostname"] == "happy-train-0" and "subdomain" not in pod["spec"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "127.0.0.1"

    st = wait_phase(kube, namespace, "happy", "Succeeded", 90, operator)
    took = done()
    assert st["reason"] == "Succeeded"
    assert st["observedGeneration"] == get(kube, namespace, "happy")["metadata"]["generation"]
    for ctype, want in (
        ("Created", "True"),
        ("Training", "False"),
        ("Evaluated", "True"),
        ("Merged", "True"),
        ("Succeeded", "True"),
        ("Failed", "False"),
    ):
        assert condition(st, ctype)["status"] == want, (ctype, st["conditions"])
        assert condition(st, ctype)["lastTransitionTime"]
    assert condition(st, "Training")["reason"] == "TrainingCompleted"
    assert st["children"] == {
        "trainJob": "happy-train",
        "evalJob": "happy-eval",
        "mergeJob": "happy-merge",
    }
    assert st["artifacts"]["adapter"] == f"s3://artifacts/sft/{namespace}/happy/adapter/"
    assert st["trainingStartTime"] and st["completionTime"] and st["restarts"] == 0
    stages = sorted(j["metadata"]["labels"]["sft.tuning.dev/stage"] for j in jobs(kube, namespace))
    assert stages == ["eval", "merge", "train"]

    # An Event for the end only (one write, not one per phase: the conditions above carry the way there).
    wait_event(kube, namespace, "happy", "Succeeded")
    assert transition_messages(kube, namespace, "happy") == ["Merging -> Succeeded"]

    # Operator metrics and health.
    text = operator.metrics()
    assert 'sftjob_operator_jobs{phase="Succeeded"} 1.0' in text
    assert 'sftjob_operator_phase_transitions_total{from_phase="Merging",to_phase="Succeeded"} 1.0' in text
    assert "sftjob_operator_time_to_training_seconds_count 1.0" in text
    assert 'sftjob_operator_handler_invocations_total{handler="child_job_event"}' in text
    assert 'sftjob_operator_handler_duration_seconds_bucket{handler="create"' in text
    assert operator.healthy()
    # kubectl get shows the phase column
    out = kube.kubectl("get", "sft", "-n", namespace).stdout
    assert "happy" in out and "Succeeded" in out
    print(f"happy path took {took:.1f}s")


def test_permanent_exit_code_fails_without_retries(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("perm", exit_code=2, runPolicy={"backoffLimit": 3}))
    st = wait_phase(kube, namespace, "perm", ("Failed", "Succeeded"), 60, operator)
    assert st["phase"] == "Failed" and st["reason"] == "TrainingFailed", st
    assert "exit code 2" in st["message"]
    assert condition(st, "Failed")["status"] == "True"
    assert condition(st, "Failed")["reason"] == "TrainingFailed"
    train = kube.get_json("job", "perm-train", "-n", namespace)
    assert train["status"].get("failed") == 1  # FailJob: no retry
    assert len(pods(kube, namespace)) == 1
    assert [j["metadata"]["name"] for j in jobs(kube, namespace)] == ["perm-train"]  # no eval/merge
    warnings = [e for e in events(kube, namespace, "perm") if e["type"] == "Warning"]
    assert any(e["reason"] == "TrainingFailed" for e in warnings)


def test_retryable_exit_code_is_retried_then_succeeds(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    """The first trainer pod exits 1 (retryable: KWOK is told so on that pod only); the replacement succeeds."""
    kube = sftjob_crd
    apply(kube, namespace, sftjob("retry", delay="4s", eval={"enabled": False}, merge={"enabled": False}))
    first = wait_until(
        lambda: next((p for p in pods(kube, namespace) if p["status"].get("phase") == "Running"), None),
        60,
        "first trainer pod",
    )
    kube.kubectl(
        "annotate",
        "pod",
        first["metadata"]["name"],
        "-n",
        namespace,
        "kwok.sftjob.dev/exit-code=1",
        "kwok.sftjob.dev/delay=0s",
        "--overwrite",
    )
    st = wait_phase(kube, namespace, "retry", ("Succeeded", "Failed"), 90, operator)
    assert st["phase"] == "Succeeded", st
    assert st["restarts"] == 1
    # a run that only trains: the manifest it advertises is the train stage's; no eval or merged output
    arts = st["artifacts"]
    assert arts["manifest"] == f"s3://artifacts/sft/{namespace}/retry/manifest.json"
    assert "eval" not in arts and "merged" not in arts, arts
    # a group restart: the failed Job attempt was deleted and re-created, and its successor succeeded
    train = kube.get_json("job", "retry-train", "-n", namespace)
    assert train["status"].get("failed", 0) == 0 and train["status"]["succeeded"] == 1
    assert len(st["recoveries"]) == 1 and st["recoveries"][0]["cause"].endswith("exit code 1"), st
    wait_event(kube, namespace, "retry", "TrainerRestarted")
    assert "sftjob_operator_restarts_total 1.0" in operator.metrics()


def test_backoff_limit_exceeded(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("backoff", exit_code=1, runPolicy={"backoffLimit": 1}))
    st = wait_phase(kube, namespace, "backoff", ("Failed", "Succeeded"), 120, operator)
    assert (st["phase"], st["reason"]) == ("Failed", "BackoffLimitExceeded"), st
    # backoffLimit 1: one group restart, then the second attempt's failure ends the run
    assert st["restarts"] == 1 and len(st["recoveries"]) == 1, st
    assert "1 group restart(s) used, runPolicy.backoffLimit is 1" in st["message"], st
    assert kube.get_json("job", "backoff-train", "-n", namespace)["status"]["failed"] == 1


def test_stuck_pending_on_unsatisfiable_gpu_request(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube = sftjob_crd
    apply(
        kube,
        namespace,
        sftjob(
            "stuck",
            gpus=16,
            training={"microBatchSize": 1, "globalBatchSize": 16},
            runPolicy={"stuckPendingTimeoutSeconds": 10, "failWhenStuckSeconds": 10},
        ),
    )

    def stuck() -> dict[str, Any] | None:
        st = status(kube, namespace, "stuck")
        return st if condition(st, "Stuck").get("status") == "True" else None

    st = wait_until(stuck, 60, "Stuck condition")
    cond = condition(st, "Stuck")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond  # the scheduler's own words
    # Said at once, before the Stuck timeout: the Unschedulable condition with the scheduler's message.
    early = condition(st, "Unschedulable")
    assert early.get("status") == "True" and "Insufficient nvidia.com/gpu" in early["message"], early
    assert early["message"].startswith("cannot be scheduled: train rank 0 (pod stuck-train-0"), early
    assert early["lastTransitionTime"] < cond["lastTransitionTime"], (early, cond)
    assert st["phase"] == "Pending"
    wait_event(kube, namespace, "stuck", "StuckUnschedulable")
    st = wait_phase(kube, namespace, "stuck", "Failed", 60, operator)
    assert st["reason"] == "Stuck" and "Insufficient nvidia.com/gpu" in st["message"]
    # A failed run stops its Pending pods.
    wait_until(
        lambda: kube.get_json("job", "stuck-train", "-n", namespace)["spec"]["suspend"],
        30,
        "train Job suspended after Failed/Stuck",
    )


def test_suspend_and_resume(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("pause", delay="6s", eval={"enabled": False}, merge={"enabled": False}))
    wait_phase(kube, namespace, "pause", "Training", 60, operator)
    kube.kubectl(
        "patch", "sftjob", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    st = wait_phase(kube, namespace, "pause", "Suspended", 30, operator)
    assert condition(st, "Suspended")["status"] == "True"
    assert kube.get_json("job", "pause-train", "-n", namespace)["spec"]["suspend"] is True
    wait_until(
        lambda: not [p for p in pods(kube, namespace) if p["status"].get("phase") in ("Running", "Pending")],
        30,
        "trainer pods gone while suspended",
    )
    time.sleep(2)
    assert status(kube, namespace, "pause")["phase"] == "Suspended"
    kube.kubectl(
        "patch", "sftjob", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    st = wait_phase(kube, namespace, "pause", "Succeeded", 60, operator)
    assert condition(st, "Suspended")["status"] == "False"
    assert condition(st, "Suspended")["reason"] == "Resumed"
    assert st["observedGeneration"] == 3
    msgs = transition_messages(kube, namespace, "pause")
    assert "Training -> Suspended" in msgs and "Suspended -> Pending" in msgs, msgs


def test_deletion_cascades_to_children(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("gone", delay="30s"))
    wait_phase(kube, namespace, "gone", "Training", 60, operator)
    assert jobs(kube, namespace) and pods(kube, namespace)
    kube.kubectl("delete", "sftjob", "gone", "-n", namespace, "--wait=true", "--timeout=30s")

    def all_gone() -> bool:
        left = [
            kube.kubectl("get", kind, "-n", namespace, "-l", "sft.tuning.dev/job-name", "-o", "name").stdout
            for kind in ("jobs", "pods")
        ]
        return not "".join(left).strip()

    wait_until(all_gone, 60, "garbage collector deleting Jobs and pods")


def test_operator_kill9_mid_run_no_duplicates(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("phoenix", delay="5s"))
    wait_phase(kube, namespace, "phoenix", "Training", 60, operator)
    operator.kill9()
    time.sleep(1)
    operator.start()
    st = wait_phase(kube, namespace, "phoenix", ("Succeeded", "Failed"), 90, operator)
    assert st["phase"] == "Succeeded", st
    names = sorted(j["metadata"]["name"] for j in jobs(kube, namespace))
    assert names == ["phoenix-eval", "phoenix-merge", "phoenix-train"]
    assert len(pods(kube, namespace, "sft.tuning.dev/stage=train")) == 1  # no second trainer
    for kind in ("services", "configmaps"):  # a one-pod run has neither
        assert not kube.get_json(kind, "-n", namespace, "-l", "sft.tuning.dev/job-name")["items"]
    # announced once, though the restarted operator reconciled it afresh (its create handler: kopf_storage.py)
    wait_event(kube, namespace, "phoenix", "Succeeded")
    assert transition_messages(kube, namespace, "phoenix") == ["Merging -> Succeeded"]


def test_invalid_spec_rejected_by_api_server(sftjob_crd: Any, namespace: str) -> None:
    kube = sftjob_crd
    bad = sftjob("bad", training={"microBatchSize": 3, "globalBatchSize": 16})
    r = kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert r.returncode != 0
    assert "spec.training.microBatchSize" in r.stderr, r.stderr


def test_operator_only_invalid_spec_ends_failed_invalid_spec(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube = sftjob_crd
    job = sftjob("local")
    job["spec"]["output"] = {"uri": "./runs"}  # fine for `sftjob run`, meaningless in a cluster
    apply(kube, namespace, job)
    st = wait_phase(kube, namespace, "local", "Failed", 30, operator)
    assert st["reason"] == "InvalidSpec"
    assert st["message"].startswith("spec.output.uri:")
    assert condition(st, "Failed")["reason"] == "InvalidSpec"
    assert jobs(kube, namespace) == []
    evs = wait_event(kube, namespace, "local", "InvalidSpec")
    assert all(e["type"] == "Warning" for e in evs if e["reason"] == "InvalidSpec"), evs
    assert operator.proc is not None and operator.proc.alive()


def test_ttl_deletes_children_keeps_sftjob(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    apply(
        kube,
        namespace,
        sftjob(
            "brief",
            eval={"enabled": False},
            merge={"enabled": False},
            runPolicy={"ttlSecondsAfterFinished": 1},
        ),
    )
    wait_phase(kube, namespace, "brief", "Succeeded", 60, operator)
    wait_until(lambda: not jobs(kube, namespace), 30, "children deleted after the TTL")
    st = status(kube, namespace, "brief")
    assert st["phase"] == "Succeeded"  # the SFTJob and its status stay
    evs = wait_event(kube, namespace, "brief", "TTLExpired")
    (ttl,) = [e["message"] for e in evs if e["reason"] == "TTLExpired"]
    assert ttl.startswith("deleted the child Jobs 1s after"), ttl  # a one-pod run had no Service


def test_eval_gate_failed_from_reported_results(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    """The eval pod reports its results as a JSON termination message (KWOK sets it from an annotation);
    the operator records them and, with a gate that does not hold, ends Failed/EvalGateFailed without merging."""
    kube = sftjob_crd
    annotations = {
        "kwok.sftjob.dev/delay": "1s",
        "kwok.sftjob.dev/message": json.dumps({"evalResults": {"evalLoss": 1.25}}),
    }
    apply(
        kube,
        namespace,
        sftjob(
            "gated",
            resources={"gpusPerNode": 1, "podAnnotations": annotations},
            eval={"gates": {"maxEvalLoss": 1.0}, "metrics": ["loss"]},
        ),
    )
    st = wait_phase(kube, namespace, "gated", ("Failed", "Succeeded"), 90, operator)
    assert (st["phase"], st["reason"]) == ("Failed", "EvalGateFailed"), st
    assert "maxEvalLoss: 1.25 > 1" in st["message"]
    assert st["evalResults"]["evalLoss"] == 1.25 and st["evalResults"]["gatesPassed"] is False
    assert condition(st, "Evaluated")["status"] == "False"
    assert sorted(j["metadata"]["name"] for j in jobs(kube, namespace)) == ["gated-eval", "gated-train"]
    assert (
        f'sftjob_operator_job_eval_loss{{namespace="{namespace}",sftjob="gated"}} 1.25' in operator.metrics()
    )


def test_active_deadline_exceeded(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("slow", delay="60s", runPolicy={"activeDeadlineSeconds": 3}))
    st = wait_phase(kube, namespace, "slow", ("Failed", "Succeeded"), 60, operator)
    assert (st["phase"], st["reason"]) == ("Failed", "DeadlineExceeded"), st
    assert kube.get_json("job", "slow-train", "-n", namespace)["spec"]["activeDeadlineSeconds"] == 3


def test_ttl_delete_sftjob_policy(sftjob_crd: Any, namespace: str, operator: Operator) -> None:
    kube = sftjob_crd
    apply(
        kube,
        namespace,
        sftjob(
            "ephemeral",
            eval={"enabled": False},
            merge={"enabled": False},
            runPolicy={"ttlSecondsAfterFinished": 1, "ttlPolicy": "DeleteSFTJob"},
        ),
    )
    # Succeeded, then deleted a second later: too quick to poll reliably, so the Events tell the story.
    # the whole lifecycle plus the TTL: 60 s was flaky with a benchmark running beside the suite
    wait_until(lambda: not get(kube, namespace, "ephemeral"), 120, "the SFTJob deleted after its TTL")
    reasons = [e["reason"] for e in events(kube, namespace, "ephemeral")]
    assert "Succeeded" in reasons and "TTLExpired" in reasons, reasons
    wait_until(lambda: not jobs(kube, namespace), 60, "its children garbage-collected")
