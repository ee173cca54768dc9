"""A group restart names the rank that died, not the first pod seen (issue 24 item 6): every rank's end is
read from its pod's container status (exit code, signal, OOMKilled, finishedAt) and the cause is the rank
that ended first on its own (signal, OOM kill, an error of its own), not by its peers' collective error.

The pods are shaped as the API server returns them (slimmed as the operator's index keeps them); the
termination messages are what the trainer and torchrun write (FallbackToLogsOnError: the log tail when the
trainer wrote none)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sftjob_api import SFTJobStatus
from sftjob_api.run_policy import RunPolicy
from sftjob_operator.handlers.state import slim_pod
from sftjob_operator.render.names import COMPLETION_INDEX_LABEL, LABEL_STAGE
from sftjob_operator.render.observe import JobObs, PodObs, observe_pod
from sftjob_operator.render.rank_ends import first_failed, signal_of
from sftjob_operator.render.recovery import classify_failure, plan_restart

# What rank 0 wrote when rank 1 vanished mid all-reduce (gloo on the real node).
GLOO_PEER_GONE = (
    "train failed (exit code 1): DistBackendError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534]"
    " Connection closed by peer [10.88.0.12]:29500"
)
# torchrun's summary when its worker was SIGKILLed (no error file: the pod's log tail is the message).
TORCHRUN_SIGKILL = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
sftjob_trainer FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_09:14:03
  host      : run-train-1.run
  rank      : 1 (local_rank: 0)
  exitcode  : -9 (pid: 57)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 57
============================================================"""


def pod(
    index: int,
    exit_code: int,
    finished: str,
    message: str | None = None,
    reason: str = "Error",
    signal: int | None = None,
    deleting: bool = False,
) -> PodObs:
    terminated: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": "2026-12-07T09:12:40Z",
        "finishedAt": finished,
        "containerID": f"containerd://{index:064x}",
    }
    if message is not None:
        terminated["message"] = message
    if signal is not None:
        terminated["signal"] = signal
    body = {
        "metadata": {
            "name": f"run-train-{index}-x{index}",
            "labels": {LABEL_STAGE: "train", COMPLETION_INDEX_LABEL: str(index)},
            "ownerReferences": [{"uid": "job-uid", "kind": "Job", "name": "run-train"}],
            "creationTimestamp": "2026-12-07T09:12:30Z",
            **({"deletionTimestamp": "2026-12-07T09:14:08Z"} if deleting else {}),
        },
        "spec": {"nodeName": f"node-{index}", "containers": [{"name": "trainer"}]},
        "status": {
            "phase": "Failed",
            "podIP": f"10.88.0.{10 + index}",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": False,
                    "restartCount": 0,
                    "image": "trainer:test",
                    "state": {"terminated": terminated},
                    "lastState": {},
                }
            ],
        },
    }
    return observe_pod(slim_pod(body), LABEL_STAGE, COMPLETION_INDEX_LABEL)


def test_a_sigkilled_rank_is_the_cause_not_the_survivor_with_the_collective_error() -> None:
    """The case measured on the real node: rank 1's trainer SIGKILLed, rank 0 exits 1 four seconds later."""
    survivor = pod(0, 1, "2026-12-07T09:14:07Z", GLOO_PEER_GONE)
    killed = pod(1, 1, "2026-12-07T09:14:03Z", TORCHRUN_SIGKILL)
    f = classify_failure([survivor, killed])
    assert f.cause == "pod run-train-1-x1 (rank 1) signal 9 (SIGKILL), exit code 1", f
    assert f.counted
    cause, other = f.ranks
    assert (cause.rank, cause.exit_code, cause.signal, cause.consequence) == (1, 1, 9, False)
    assert cause.finished_at == datetime(2026, 12, 7, 9, 14, 3, tzinfo=UTC)
    assert (other.rank, other.exit_code, other.signal, other.consequence) == (0, 1, None, True)


def test_an_own_error_beats_a_collective_error_that_ended_in_the_same_second() -> None:
    same = "2026-12-07T09:14:03Z"
    survivor = pod(0, 1, same, GLOO_PEER_GONE)
    crashed = pod(1, 1, same, "train failed (exit code 1): ValueError: loss is nan at step 6")
    assert first_failed([survivor, crashed]) is crashed


def test_an_oom_kill_that_ended_later_is_still_the_cause() -> None:
    """The peers' collective errors are consequences even when they ended first (a collective timeout can
    fire before the kubelet reports the OOM kill): the OOM-killed rank is the cause."""
    peer = pod(0, 1, "2026-12-07T09:14:01Z", "RuntimeError: ProcessGroupGloo: collective operation timeout")
    oom = pod(2, 137, "2026-12-07T09:14:02Z", reason="OOMKilled")
    other = pod(1, 1, "2026-12-07T09:14:01Z", GLOO_PEER_GONE)
    f = classify_failure([peer, other, oom])
    assert f.cause == "pod run-train-2-x2 (rank 2) OOMKilled, exit code 137", f
    assert [r.rank for r in f.ranks] == [2, 0, 1]  # the cause first, then in the order they ended
    assert f.ranks[0].signal == 9 and f.ranks[0].reason == "OOMKilled"


def test_the_container_signal_field_and_a_128_plus_n_exit_code_are_signals() -> None:
    assert signal_of(pod(0, 137, "2026-12-07T09:14:03Z", signal=9)) == 9
    assert signal_of(pod(0, 139, "2026-12-07T09:14:03Z")) == 11  # SIGSEGV
    # 143 is the trainer's own exit after SIGTERM (checkpoint saved): a requested stop, not a crash
    assert signal_of(pod(0, 143, "2026-12-07T09:14:03Z")) is None


def test_the_teardowns_sigterm_and_deletion_are_consequences() -> None:
    """The Job controller deletes the surviving ranks once the Job fails; they may end before the cause's
    status reaches the operator's view, with exit 143 after saving a checkpoint."""
    torn_down = pod(0, 143, "2026-12-07T09:14:02Z", "Preempted: SIGTERM", deleting=True)
    crashed = pod(1, 75, "2026-12-07T09:14:04Z", "StorageError: s3 PUT failed after 5 retries")
    f = classify_failure([torn_down, crashed])
    assert f.cause == "pod run-train-1-x1 (rank 1) exit code 75", f


def test_when_every_end_looks_like_a_consequence_the_first_to_end_is_named() -> None:
    late = pod(0, 1, "2026-12-07T09:14:09Z", GLOO_PEER_GONE)
    early = pod(1, 1, "2026-12-07T09:14:05Z", GLOO_PEER_GONE)
    assert first_failed([late, early]) is early


def test_the_recovery_records_every_ranks_end() -> None:
    survivor = pod(0, 1, "2026-12-07T09:14:07Z", GLOO_PEER_GONE)
    killed = pod(1, 1, "2026-12-07T09:14:03Z", TORCHRUN_SIGKILL)
    job = JobObs(name="run-train", uid="job-uid", failed=2, failed_reason="BackoffLimitExceeded")
    now = datetime(2026, 12, 7, 9, 14, 10, tzinfo=UTC)
    prev = SFTJobStatus.model_validate({"phase": "Training", "progress": {"step": 6}})
    plan = plan_restart(prev, RunPolicy(), job, [survivor, killed], None, now)
    [rec] = plan.status.recoveries
    assert rec.cause.startswith("pod run-train-1-x1 (rank 1) signal 9 (SIGKILL)")
    wire = plan.status.model_dump(mode="json", exclude_none=True)["recoveries"][0]["ranks"]
    assert wire == [
        {"rank": 1, "pod": "run-train-1-x1", "exitCode": 1, "signal": 9, "reason": "Error",
         "finishedAt": "2026-12-07T09:14:03Z", "consequence": False},
        {"rank": 0, "pod": "run-train-0-x0", "exitCode": 1, "reason": "Error",
         "finishedAt": "2026-12-07T09:14:07Z", "consequence": True},
    ]  # fmt: skip
    assert SFTJobStatus.model_validate(plan.status.model_dump(mode="json")) == plan.status
