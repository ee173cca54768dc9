"""Unit tests of the phase machine, conditions, gates, stuck detection and progress parsing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from sftjob_api import Phase, SFTJobStatus, Stage, parse_spec
from sftjob_api.evaluation import EvalGates
from sftjob_api.status import EvalResults
from sftjob_operator.render import phase as ph
from sftjob_operator.render.conditions import derive_conditions, get_condition, set_condition
from sftjob_operator.render.names import ChildNames
from sftjob_operator.render.observe import (
    JobObs,
    PodObs,
    Waiting,
    observe_job,
    observe_pod,
    parse_eval_results,
)
from sftjob_operator.render.progress import (
    checkpoint_step,
    format_duration,
    parse_data,
    parse_progress,
    progress_changed,
)
from sftjob_operator.render.status import build_status, failed_pod_message, parse_status, status_patch
from sftjob_operator.render.stuck import JobEvent, Stuck, detect_stuck, stuck_failure_message

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def job(name: str = "x-train", **kw: object) -> JobObs:
    return JobObs(name=name, **kw)  # type: ignore[arg-type]


DONE = job(complete=True, succeeded=1)
RUNNING = job(active=1, ready=1)


def observed(**kw: object) -> ph.Observed:
    """ph.Observed with the stage Jobs given by stage name (curate=, train=, align=, eval=, merge=)."""
    jobs = {Stage(s): kw.pop(s) for s in Stage if kw.get(s) is not None}
    for s in Stage:
        kw.pop(s, None)
    return ph.Observed(jobs=jobs, **kw)  # type: ignore[arg-type]


def decide(**kw: object) -> ph.Decision:
    return ph.next_phase(observed(**kw))


# ---- next_phase -------------------------------------------------------------------------------------------


def test_new_sftjob_is_pending_until_children_exist() -> None:
    assert decide() == ph.Decision("Pending", "CreatingChildren", "creating the training Job")


def test_pending_while_pods_not_running() -> None:
    d = decide(train=job(active=1))
    assert (d.phase, d.reason) == ("Pending", "PodsPending")


def test_training_when_a_pod_runs() -> None:
    assert decide(train=job(active=1), running_group_pods=1).phase == "Training"
    d = decide(train=RUNNING)
    assert (d.phase, d.reason) == ("Training", "PodsRunning")


def test_retry_keeps_training_phase() -> None:
    d = decide(phase="Training", train=job(active=1, failed=1))
    assert (d.phase, d.reason) == ("Training", "Restarting")
    # pods done, Job not yet Complete: still Training, not a restart
    d = decide(phase="Training", train=job(active=0, succeeded=1))
    assert (d.phase, d.reason) == ("Training", "Finishing")
    # a train Job just re-created by a group restart: no pods yet, none finished
    d = decide(phase="Training", train=job(active=0))
    assert (d.phase, d.reason) == ("Training", "Restarting")


def test_full_happy_path() -> None:
    assert decide(train=DONE).phase == "Evaluating"
    assert decide(train=DONE, eval=job("x-eval", active=1)).phase == "Evaluating"
    d = decide(train=DONE, eval=job("x-eval", complete=True), gate_failures=())
    assert (d.phase, d.reason) == ("Merging", "MergeRunning")
    assert (
        decide(
            train=DONE, eval=job("x-eval", complete=True), gate_failures=(), merge=job("x-merge", active=1)
        ).phase
        == "Merging"
    )
    d = decide(
        train=DONE, eval=job("x-eval", complete=True), gate_failures=(), merge=job("x-merge", complete=True)
    )
    assert (d.phase, d.reason) == ("Succeeded", "Succeeded")


TRAIN_MERGE = (Stage.TRAIN, Stage.MERGE)
TRAIN_ONLY = (Stage.TRAIN,)
TRAIN_EVAL = (Stage.TRAIN, Stage.EVAL)


def test_eval_and_merge_skipped_when_disabled() -> None:
    assert decide(train=DONE, stages=TRAIN_MERGE).phase == "Merging"
    d = decide(train=DONE, stages=TRAIN_ONLY)
    assert d.phase == "Succeeded" and d.message == "training completed"
    assert decide(train=DONE, eval=job(complete=True), stages=TRAIN_EVAL).phase == "Succeeded"


CURATED = (Stage.CURATE, Stage.TRAIN, Stage.EVAL, Stage.MERGE)
CURATING = job("x-curate", active=1, ready=1)
CURATED_DONE = job("x-curate", complete=True, succeeded=1)


def test_curation_comes_first_and_holds_no_training_job() -> None:
    """spec.dataset.curation: the curate Job runs alone; the train Job is created only once it completed."""
    d = decide(stages=CURATED)
    assert d == ph.Decision("Pending", "CreatingChildren", "creating the curation Job")
    assert ph.active_stage(observed(stages=CURATED)) == "curate"
    for curate in (CURATING, job("x-curate")):  # running, or created with no pod yet
        obs = observed(stages=CURATED, curate=curate)
        d = ph.next_phase(obs)
        assert (d.phase, d.reason) == ("Curating", "CurateRunning")
        assert ph.active_stage(obs) == "curate"  # not train: no GPU held while curating
    # complete: now the train Job
    obs = observed(stages=CURATED, curate=CURATED_DONE)
    d = ph.next_phase(obs)
    assert d == ph.Decision("Pending", "CreatingChildren", "creating the training Job")
    assert ph.active_stage(obs) == "train"
    assert decide(stages=CURATED, curate=CURATED_DONE, train=job(active=1)).reason == "PodsPending"
    assert decide(stages=CURATED, curate=CURATED_DONE, train=RUNNING).phase == "Training"
    d = decide(stages=CURATED, curate=CURATED_DONE, train=DONE)
    assert (d.phase, d.reason) == ("Evaluating", "EvalRunning")
    d = decide(stages=CURATED, curate=CURATED_DONE, train=DONE, eval=DONE, merge=DONE, gate_failures=())
    assert d == ph.Decision("Succeeded", "Succeeded", "curation, training, evaluation and merge completed")
    # a train Job exists only after curation: a curate Job deleted later is not run again
    obs = observed(stages=CURATED, train=RUNNING)
    assert ph.next_phase(obs).phase == "Training" and ph.active_stage(obs) == "train"
    # the default (a spec without dataset.curation) never curates
    assert Stage.CURATE not in observed().stages and decide(curate=CURATING).phase == "Pending"


def test_curation_failure_says_why() -> None:
    failed = job("x-curate", failed=1, failed_reason="PodFailurePolicy", failed_message="exit code 2 ...")
    why = "curation gate maxDropFraction: 0.42 of the input rows were dropped > 0.2"
    obs = observed(stages=CURATED, curate=failed, curate_failure=why)
    d = ph.next_phase(obs)
    assert (d.phase, d.reason) == ("Failed", "CurationFailed")
    assert d.message == f"curation Job failed (PodFailurePolicy): {why}"
    assert ph.stage_to_create(obs) is None  # no train Job, ever
    d = decide(stages=CURATED, curate=replace(failed, failed_reason="BackoffLimitExceeded"))
    assert d.message == "curation Job failed (BackoffLimitExceeded): exit code 2 ..."  # no pod message


def test_curation_suspended_and_queued() -> None:
    assert decide(stages=CURATED, suspend=True) == ph.Decision(
        "Suspended", "Suspended", "spec.suspend is true; nothing is running"
    )
    d = decide(stages=CURATED, suspend=True, curate=CURATING)
    assert d == ph.Decision("Suspended", "Suspended", "curation suspended by spec.suspend")
    assert decide(stages=CURATED, suspend=True, curate=replace(CURATING, suspended=True)).phase == "Suspended"
    # resumed: the curate Job still suspended for a moment -> Curating again
    assert (
        decide(stages=CURATED, phase="Suspended", curate=job("x-curate", suspended=True)).phase == "Curating"
    )
    # suspended after curation: the train Job is not created until resumed (Suspended, nothing running)
    assert decide(stages=CURATED, suspend=True, curate=CURATED_DONE).phase == "Suspended"
    d = decide(stages=CURATED, queued=True, curate=job("x-curate", suspended=True))
    assert d == ph.Decision("Curating", "Queued", "waiting for Kueue to admit the curation Job")
    d = decide(stages=CURATED, queued=True, curate=CURATED_DONE, train=job(suspended=True))
    assert (d.phase, d.reason) == ("Pending", "Queued")


@pytest.mark.parametrize(
    ("k8s_reason", "reason"),
    [
        ("PodFailurePolicy", "TrainingFailed"),
        ("BackoffLimitExceeded", "BackoffLimitExceeded"),
        ("DeadlineExceeded", "DeadlineExceeded"),
        ("SomethingNew", "TrainingFailed"),
    ],
)
def test_training_failures(k8s_reason: str, reason: str) -> None:
    d = decide(train=job(failed=1, failed_reason=k8s_reason, failed_message="boom"))
    assert (d.phase, d.reason) == ("Failed", reason)


def test_eval_merge_gate_failures() -> None:
    assert decide(train=DONE, eval=job(failed_reason="BackoffLimitExceeded")).reason == "EvalFailed"
    d = decide(train=DONE, eval=job(complete=True), gate_failures=("maxEvalLoss: 2.3 > 2",))
    assert (d.phase, d.reason) == ("Failed", "EvalGateFailed")
    assert "maxEvalLoss" in d.message and "adapter kept" in d.message
    # the trainer's eval exits EVAL_GATE_FAILED (a FailJob code): the Job fails by PodFailurePolicy
    d = decide(train=DONE, eval=job(failed_reason="PodFailurePolicy"), eval_gate_exit="maxEvalLoss: 2.5 > 2")
    assert (d.phase, d.reason) == ("Failed", "EvalGateFailed") and "maxEvalLoss: 2.5 > 2" in d.message
    d = decide(
        train=DONE, eval=job(complete=True), gate_failures=(), merge=job(failed_reason="PodFailurePolicy")
    )
    assert (d.phase, d.reason) == ("Failed", "MergeFailed")


def test_invalid_spec_wins_and_terminal_is_sticky() -> None:
    d = decide(spec_error="spec.output.uri: bad", train=RUNNING)
    assert (d.phase, d.reason, d.message) == ("Failed", "InvalidSpec", "spec.output.uri: bad")
    assert decide(phase="Succeeded", train=job(failed_reason="X")).phase == "Succeeded"
    assert decide(phase="Failed", train=DONE).phase == "Failed"


def test_suspend_in_every_stage() -> None:
    assert decide(suspend=True).phase == "Suspended"
    assert decide(suspend=True, train=job(suspended=True)).phase == "Suspended"
    assert decide(suspend=True, train=DONE).phase == "Suspended"
    assert decide(suspend=True, train=DONE, eval=job(active=1)).phase == "Suspended"
    assert decide(suspend=True, train=DONE, eval=job(complete=True), gate_failures=()).phase == "Suspended"
    # a finished run stays finished
    assert decide(suspend=True, phase="Succeeded").phase == "Succeeded"
    # resume: the child is still suspended for a moment -> Pending, not Suspended
    assert decide(phase="Suspended", train=job(suspended=True)).phase == "Pending"
    # ... and while the suspended Job's pods still show Running (tests/chaos saw Suspended -> Training ->
    # Pending when the watch cache lagged behind the operator's own suspend of the Job)
    assert decide(phase="Suspended", train=RUNNING, running_group_pods=1).phase == "Pending"
    assert decide(phase="Pending", train=RUNNING, running_group_pods=1).phase == "Training"


def test_suspend_waits_for_the_trainers_to_save_and_exit() -> None:
    # SIGTERM makes each trainer save a checkpoint: Suspended only once no train pod is left running.
    for running, stopping in ((2, 0), (0, 1), (1, 1)):
        d = decide(
            suspend=True,
            phase="Training",
            train=RUNNING,
            running_group_pods=running,
            stopping_group_pods=stopping,
        )
        assert (d.phase, d.reason) == ("Training", "Suspending"), (running, stopping, d)
        assert f"{running + stopping} trainer pod(s)" in d.message
    assert decide(suspend=True, phase="Training", train=RUNNING).phase == "Suspended"
    # once Suspended, a stale view of the stopping pods does not move the phase back
    assert decide(suspend=True, phase="Suspended", train=RUNNING, stopping_group_pods=1).phase == "Suspended"


def test_kueue_queued() -> None:
    d = decide(queued=True, train=job(suspended=True))
    assert (d.phase, d.reason) == ("Pending", "Queued")
    assert decide(queued=True, train=RUNNING).phase == "Training"
    assert decide(queued=True, train=DONE, eval=job(suspended=True)).reason == "Queued"


def test_stuck_failure() -> None:
    d = decide(train=job(active=1), stuck_failure="stuck for 30s")
    assert (d.phase, d.reason) == ("Failed", "Stuck")


def test_active_stage() -> None:
    obs = observed(train=DONE)
    assert ph.active_stage(obs) == "eval"
    obs = observed(train=DONE, stages=TRAIN_MERGE)
    assert ph.active_stage(obs) == "merge"
    obs = observed(train=None)
    assert ph.active_stage(obs) == "train"
    obs = observed(train=job(failed_reason="X"))
    assert ph.stage_to_create(obs) is None  # a failed Job is not created again
    assert ph.stage_to_create(observed(train=DONE)) == "eval"
    gated = observed(train=DONE, eval=DONE, gate_failures=("maxEvalLoss: 3 > 2",))
    assert ph.stage_to_create(gated) is None  # Failed/EvalGateFailed: no merge
    assert ph.stage_to_create(observed(train=DONE, spec_error="spec.x: bad")) is None


def test_gates() -> None:
    res = EvalResults(eval_loss=2.5, perplexity=12.0, rouge_l=0.3, exact_match=0.5)
    assert EvalGates().failures(res) == []
    assert EvalGates(max_eval_loss=3.0, min_rouge_l=0.2).failures(res) == []
    f = EvalGates(max_eval_loss=2.0, min_rouge_l=0.35, min_exact_match=0.5).failures(res)
    assert f == ["maxEvalLoss: 2.5 > 2", "minRougeL: 0.3 < 0.35"]
    assert EvalGates(max_perplexity=5).failures(EvalResults()) == [
        "maxPerplexity: perplexity was not computed"
    ]


# ---- observe ----------------------------------------------------------------------------------------------


def test_observe_job_conditions() -> None:
    j = observe_job(
        {
            "metadata": {"name": "a"},
            "spec": {"completions": 2, "suspend": False},
            "status": {"active": 2, "ready": 1, "failed": 1, "startTime": "2026-01-01T00:00:00Z"},
        }
    )
    assert (j.active, j.ready, j.failed, j.completions, j.finished) == (2, 1, 1, 2, False)
    j = observe_job(
        {
            "metadata": {"name": "a"},
            "status": {
                "conditions": [
                    {
                        "type": "FailureTarget",
                        "status": "True",
                        "reason": "PodFailurePolicy",
                        "message": "exit 2",
                    },
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "PodFailurePolicy",
                        "message": "exit code 2",
                    },
                ]
            },
        }
    )
    assert j.failed_reason == "PodFailurePolicy" and j.failed_message == "exit code 2" and not j.complete
    j = observe_job(
        {
            "metadata": {"name": "a"},
            "status": {
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True"},
                    {"type": "Complete", "status": "True"},
                ]
            },
        }
    )
    assert j.complete and j.finished
    j = observe_job(
        {"metadata": {"name": "a"}, "status": {"conditions": [{"type": "Complete", "status": "False"}]}}
    )
    assert not j.complete


def test_observe_pod() -> None:
    p = observe_pod(
        {
            "metadata": {
                "name": "p",
                "labels": {"sft.tuning.dev/stage": "train", "batch.kubernetes.io/job-completion-index": "0"},
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
        },
        "sft.tuning.dev/stage",
        "batch.kubernetes.io/job-completion-index",
    )
    assert p.index == 0 and p.stage == "train" and p.unschedulable_message and not p.scheduled


def test_eval_results_from_termination_message() -> None:
    msg = '{"evalResults": {"evalLoss": 1.5, "perplexity": 4.48, "rougeL": 0.4, "gatesPassed": true}}'
    assert parse_eval_results(msg) == EvalResults(
        eval_loss=1.5, perplexity=4.48, rouge_l=0.4, gates_passed=True
    )
    assert parse_eval_results('log line\n{"evalResults": {"evalLoss": 2}}') == EvalResults(eval_loss=2.0)
    assert parse_eval_results('{"evalResults": {"evalLos": 2}}') is None  # a misspelled key is refused
    assert parse_eval_results("Traceback ...") is None
    assert parse_eval_results(None) is None


# ---- conditions -------------------------------------------------------------------------------------------


def test_conditions_happy_path_and_transition_times() -> None:
    obs = observed(train=RUNNING)
    conds = derive_conditions([], ph.next_phase(obs), obs, NOW, 1)
    assert get_condition(conds, "Created").status == "True"  # type: ignore[union-attr]
    assert get_condition(conds, "Training").status == "True"  # type: ignore[union-attr]
    assert get_condition(conds, "Succeeded") is None  # appears when the run ends
    later = NOW + timedelta(minutes=5)
    obs2 = observed(train=DONE, eval=job(complete=True), merge=job(complete=True), gate_failures=())
    conds2 = derive_conditions(conds, ph.next_phase(obs2), obs2, later, 1)
    by = {c.type: c for c in conds2}
    assert by["Created"].last_transition_time == NOW  # unchanged status keeps its time
    assert by["Training"].status == "False" and by["Training"].reason == "TrainingCompleted"
    assert by["Training"].last_transition_time == later
    assert by["Evaluated"].status == by["Merged"].status == by["Succeeded"].status == "True"
    assert by["Failed"].status == "False"
    assert [c.type for c in conds2] == [
        "Created",
        "Training",
        "Evaluated",
        "Merged",
        "Succeeded",
        "Failed",
    ]


def test_conditions_failure_and_suspend() -> None:
    obs = observed(train=job(failed_reason="PodFailurePolicy"))
    by = {c.type: c for c in derive_conditions([], ph.next_phase(obs), obs, NOW, 2)}
    assert by["Failed"].status == "True" and by["Failed"].reason == "TrainingFailed"
    assert by["Failed"].observed_generation == 2
    obs = observed(suspend=True, train=job(suspended=True))
    conds = derive_conditions([], ph.next_phase(obs), obs, NOW, 1)
    assert get_condition(conds, "Suspended").status == "True"  # type: ignore[union-attr]
    obs = observed(phase=Phase.SUSPENDED, train=RUNNING)
    conds = derive_conditions(conds, ph.next_phase(obs), obs, NOW, 2)
    assert get_condition(conds, "Suspended").reason == "Resumed"  # type: ignore[union-attr]
    invalid = observed(spec_error="spec.x: bad")
    by = {c.type: c for c in derive_conditions([], ph.next_phase(invalid), invalid, NOW, 1)}
    assert by["Failed"].reason == "InvalidSpec" and "Created" not in by


def test_curated_condition() -> None:
    # absent without a curate stage
    obs = observed(train=DONE, eval=job(complete=True), merge=job(complete=True), gate_failures=())
    assert get_condition(derive_conditions([], ph.next_phase(obs), obs, NOW, 1), "Curated") is None
    obs = observed(stages=CURATED, curate=CURATING)
    conds = derive_conditions([], ph.next_phase(obs), obs, NOW, 1)
    by = {c.type: c for c in conds}
    assert (by["Curated"].status, by["Curated"].reason) == ("False", "CurateRunning")
    assert by["Created"].status == "True" and by["Created"].message == "curation Job x-curate created"
    assert by["Training"].status == "False" and [c.type for c in conds] == ["Created", "Curated", "Training"]
    later = NOW + timedelta(minutes=1)
    obs = observed(stages=CURATED, curate=CURATED_DONE, train=RUNNING)
    by = {c.type: c for c in derive_conditions(conds, ph.next_phase(obs), obs, later, 1)}
    assert (by["Curated"].status, by["Curated"].reason) == ("True", "CurationCompleted")
    assert by["Curated"].last_transition_time == later and by["Training"].status == "True"
    assert (
        by["Created"].message == "training Job x-train created" and by["Created"].last_transition_time == NOW
    )
    failed = job("x-curate", failed_reason="PodFailurePolicy")
    obs = observed(stages=CURATED, curate=failed, curate_failure="maxDropFraction: 0.5 > 0.2")
    by = {c.type: c for c in derive_conditions(conds, ph.next_phase(obs), obs, later, 1)}
    assert (by["Curated"].status, by["Curated"].reason) == ("False", "CurationFailed")
    assert "maxDropFraction: 0.5 > 0.2" in by["Curated"].message and by["Failed"].reason == "CurationFailed"


def test_failed_pod_message_is_the_newest_failed_pods_own_words() -> None:
    failed = job("x-curate", failed=2, failed_reason="BackoffLimitExceeded")
    pods = [
        PodObs("c-1", "curate", "Failed", NOW, termination_message="first try\n", exit_code=1),
        PodObs(
            "c-2", "curate", "Failed", NOW + timedelta(seconds=5), termination_message="bad file", exit_code=2
        ),
        PodObs(
            "t-0", "train", "Failed", NOW + timedelta(seconds=9), termination_message="other", exit_code=2
        ),
        PodObs(
            "c-3", "curate", "Succeeded", NOW + timedelta(seconds=9), termination_message="{}", exit_code=0
        ),
    ]
    assert failed_pod_message(failed, pods, Stage.CURATE) == "bad file"
    assert failed_pod_message(failed, pods[:1], Stage.CURATE) == "first try"
    assert failed_pod_message(failed, pods[3:], Stage.CURATE) is None
    assert failed_pod_message(CURATING, pods, Stage.CURATE) is None  # the Job has not failed
    assert failed_pod_message(None, pods, Stage.CURATE) is None


def test_set_condition_is_idempotent() -> None:
    c1 = set_condition([], "Stuck", "True", "Unschedulable", "m", NOW, 1)
    c2 = set_condition(c1, "Stuck", "True", "Unschedulable", "m", NOW + timedelta(hours=1), 1)
    assert c1 == c2


# ---- stuck ------------------------------------------------------------------------------------------------


def pod(phase: str = "Pending", age: float = 100, **kw: object) -> PodObs:
    return PodObs(name="p-0", stage="train", phase=phase, created=NOW - timedelta(seconds=age), **kw)  # type: ignore[arg-type]


def test_stuck_unschedulable_names_the_scheduler_message() -> None:
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    s = detect_stuck([pod(unschedulable_message=msg)], NOW, 0, False, [], NOW, 60)
    assert s is not None and s.reason == "Unschedulable" and msg in s.message
    assert detect_stuck([pod(age=30, unschedulable_message=msg)], NOW, 0, False, [], NOW, 60) is None
    assert detect_stuck([pod(unschedulable_message=msg)], NOW, 0, True, [], NOW, 60) is None
    assert detect_stuck([pod(phase="Running")], NOW, 1, False, [], NOW, 60) is None


def test_stuck_image_pull_and_quota() -> None:
    s = detect_stuck(
        [pod(scheduled=True, waiting=(Waiting("ImagePullBackOff", "back-off pulling"),))],
        NOW,
        1,
        False,
        [],
        NOW,
        60,
    )
    assert s is not None and s.reason == "ImagePullBackOff"
    ev = [
        JobEvent(
            "FailedCreate", 'pods "x" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=8', NOW
        )
    ]
    s = detect_stuck([], NOW - timedelta(seconds=120), 0, False, ev, NOW, 60)
    assert s is not None and s.reason == "QuotaExceeded" and "exceeded quota" in s.message
    assert detect_stuck([], NOW - timedelta(seconds=120), 0, False, [], NOW, 60) is None


def test_stuck_failure_after_second_timeout() -> None:
    s = detect_stuck([pod(age=100, unschedulable_message="no")], NOW, 0, False, [], NOW, 60)
    assert s is not None
    assert stuck_failure_message(s, NOW, 60, None) is None
    assert stuck_failure_message(s, NOW, 60, 60) is None
    assert stuck_failure_message(s, NOW, 60, 30) is not None


# ---- progress ---------------------------------------------------------------------------------------------

METRICS = """# HELP sft_train_step Optimizer steps done.
# TYPE sft_train_step gauge
sft_train_step{namespace="ns",job="j",rank="0"} 120.0
# TYPE sft_train_total_steps gauge
sft_train_total_steps{namespace="ns",job="j",rank="0"} 480.0
# TYPE sft_train_loss gauge
sft_train_loss{namespace="ns",job="j",rank="0"} 1.23456
# TYPE sft_train_tokens_per_second gauge
sft_train_tokens_per_second{namespace="ns",job="j",rank="0"} 2413.37
# TYPE sft_train_eta_seconds gauge
sft_train_eta_seconds{namespace="ns",job="j",rank="0"} 4330
# TYPE sft_train_epoch gauge
sft_train_epoch{namespace="ns",job="j",rank="0"} 0.25
"""


def test_parse_progress() -> None:
    p = parse_progress(METRICS, NOW)
    assert p is not None and p.model_dump(mode="json", exclude_none=True) == {
        "step": 120,
        "totalSteps": 480,
        "percent": 25.0,
        "summary": "120/480 (25%)",
        "loss": 1.2346,
        "tokensPerSecond": 2413.4,
        "eta": "1h12m",
        "epoch": 0.25,
        "lastUpdate": "2026-01-01T12:00:00Z",
    }
    assert parse_progress("# nothing\nfoo 1\n", NOW) is None
    assert progress_changed(None, p)
    assert not progress_changed(p, p.model_copy(update={"last_update": NOW + timedelta(seconds=5)}))
    assert progress_changed(p, p.model_copy(update={"step": 121}))


DATA_REPORT = {  # the parts of DataReport.as_dict() the trainer exports
    "dropped": {"duplicate": 3, "contaminated": 2},
    "sources": {"general": {"mixed_rows": 300}, "domain": {"mixed_rows": 100}},
    "content_hash": "sha256:0f1e",
    "train_examples": 400,
}


def test_parse_data_from_the_trainers_own_exporter() -> None:
    from prometheus_client import generate_latest

    from sftjob_trainer.metrics import TrainerMetrics

    tm = TrainerMetrics("ns", "run", 0, None)
    assert parse_data(generate_latest(tm.registry).decode()) is None  # not curated yet
    tm.record_data(DATA_REPORT, reused=True)
    d = parse_data(generate_latest(tm.registry).decode())
    assert d is not None and d.model_dump(mode="json") == {
        "trainExamples": 400,
        "contentHash": "sha256:0f1e",
        "reused": True,
        "dropped": {"duplicate": 3, "contaminated": 2},
        "mixture": {"general": 300, "domain": 100},
    }


def test_progress_is_complete_once_the_train_job_succeeded() -> None:
    # The last reading of rank 0's metrics was short of the end; the Job's success says the rest.
    last = parse_progress(METRICS, NOW)
    assert last is not None and (last.step, last.total_steps) == (120, 480)
    prev = parse_status({"phase": "Training", "progress": last.model_dump(mode="json", by_alias=True)})
    meta = {"namespace": "ns", "name": "run", "creationTimestamp": "2026-01-01T11:00:00Z"}
    for train, want in ((RUNNING, "120/480 (25%)"), (DONE, "480/480 (100%)"), (FAILED_JOB, "120/480 (25%)")):
        obs = observed(phase=Phase.TRAINING, train=train, eval=job(active=1))
        status = build_status(
            meta, prev, SPEC, ph.next_phase(obs), obs, None, None, NOW, 1, ChildNames("run")
        )
        assert status.progress is not None and status.progress.summary == want, train
        if train is DONE:
            assert (status.progress.step, status.progress.percent, status.progress.eta) == (480, 100.0, None)
            assert status.progress.loss == last.loss  # the last loss read stays


def test_checkpoint_step_from_trainer_metrics() -> None:
    assert checkpoint_step(METRICS) is None  # no checkpoint metrics at all
    labels = 'namespace="ns",sftjob="j",rank="0"'
    fresh = f"sft_train_checkpoint_step{{{labels}}} 0.0\nsft_train_resumed_from_step{{{labels}}} 0.0\n"
    assert checkpoint_step(METRICS + fresh) is None  # 0: none saved, not resumed
    resumed = f"sft_train_checkpoint_step{{{labels}}} 0.0\nsft_train_resumed_from_step{{{labels}}} 40.0\n"
    assert checkpoint_step(resumed) == 40  # before its first save: the checkpoint it resumed from
    saved = f"sft_train_checkpoint_step{{{labels}}} 60.0\nsft_train_resumed_from_step{{{labels}}} 40.0\n"
    assert checkpoint_step(saved) == 60


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59, 61, 3600, 90061)] == ["0s", "59s", "1m01s", "1h00m", "1d1h"]


def test_replace_keeps_frozen_observed() -> None:
    o = observed(train=RUNNING)
    assert replace(o, suspend=True).suspend and not o.suspend


# ---- the status built from every phase ---------------------------------------------------------------------

SPEC = parse_spec(
    {
        "model": {"uri": "s3://models/m"},
        "dataset": {"train": ["s3://data/train.jsonl"]},
        "output": {"uri": "s3://out/runs"},
        "eval": {"gates": {"maxEvalLoss": 2.0}},
    }
)
FAILED_JOB = job(failed_reason="BackoffLimitExceeded", failed=3)
ALIGNED = (Stage.TRAIN, Stage.ALIGN, Stage.EVAL, Stage.MERGE)
SCENARIOS = {
    "creating": observed(),
    "queued": observed(queued=True, train=job(suspended=True)),
    "pods pending": observed(train=job()),
    "training": observed(train=RUNNING),
    "restarting": observed(phase=Phase.TRAINING, train=job(failed=1)),
    "evaluating": observed(phase=Phase.TRAINING, train=DONE),
    "merging": observed(phase=Phase.EVALUATING, train=DONE, eval=job(complete=True), gate_failures=()),
    "succeeded": observed(
        phase=Phase.MERGING, train=DONE, eval=job(complete=True), gate_failures=(), merge=job(complete=True)
    ),
    "train-only succeeded": observed(phase=Phase.TRAINING, train=DONE, stages=TRAIN_ONLY),
    "invalid spec": observed(spec_error="spec.x: bad"),
    "backoff": observed(phase=Phase.TRAINING, train=FAILED_JOB),
    "gate failed": observed(
        phase=Phase.EVALUATING, train=DONE, eval=job(complete=True), gate_failures=("maxEvalLoss: 2.5 > 2",)
    ),
    "merge failed": observed(
        phase=Phase.MERGING, train=DONE, eval=job(complete=True), gate_failures=(), merge=FAILED_JOB
    ),
    "stuck": observed(phase=Phase.PENDING, train=job(), stuck_failure="stuck for 700s"),
    "suspended": observed(suspend=True, train=RUNNING),
    "curating": observed(stages=CURATED, curate=CURATING),
    "aligning": observed(phase=Phase.TRAINING, stages=ALIGNED, train=DONE, align=RUNNING),
    "alignment failed": observed(
        phase=Phase.ALIGNING,
        stages=ALIGNED,
        train=DONE,
        align=job("run-align", failed_reason="PodFailurePolicy"),
        group_failure="align.jsonl:3: chosen equals rejected",
    ),
    "curation failed": observed(
        phase=Phase.CURATING,
        stages=CURATED,
        curate=job("run-curate", failed_reason="PodFailurePolicy"),
        curate_failure="a bad input file",
    ),
    "curated, succeeded": observed(
        phase=Phase.MERGING,
        stages=CURATED,
        curate=CURATED_DONE,
        train=DONE,
        eval=job(complete=True),
        gate_failures=(),
        merge=job(complete=True),
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_built_status_is_a_valid_sftjob_status(name: str) -> None:
    obs = SCENARIOS[name]
    decision = ph.next_phase(obs)
    meta = {"namespace": "ns", "name": "run", "creationTimestamp": "2026-01-01T11:00:00Z"}
    prev = parse_status({"phase": obs.phase} if obs.phase else {})
    results = EvalResults(eval_loss=2.5) if obs.gate_failures else None
    stuck = Stuck("Unschedulable", "pod run-train-0 Pending", NOW) if obs.stuck_failure else None
    spec = None if obs.spec_error else SPEC
    status = build_status(meta, prev, spec, decision, obs, results, stuck, NOW, 3, ChildNames("run"))
    wire = status.model_dump(mode="json", exclude_none=True)
    assert SFTJobStatus.model_validate(wire) == status  # what the apiserver stores reads back the same
    assert wire["phase"] == decision.phase and wire["observedGeneration"] == 3
    assert status_patch(wire, status) == {}  # written once, the same status is not written again
    if decision.phase == Phase.SUCCEEDED and spec is not None:
        assert wire["artifacts"]["manifest"] == "s3://out/runs/ns/run/manifest.json"


def test_the_scenarios_cover_every_phase() -> None:
    assert {ph.next_phase(obs).phase for obs in SCENARIOS.values()} == set(Phase)


def test_a_stored_status_with_an_unknown_key_keeps_the_rest() -> None:
    stored = {"phase": "Training", "restarts": 2, "progres": {"step": 1}, "startTime": "2026-01-01T11:00:00Z"}
    prev = parse_status(stored)
    assert prev.phase == Phase.TRAINING and prev.restarts == 2 and prev.start_time is not None


def test_goes_back_only_along_the_forward_chain() -> None:
    """The reconciler re-reads the children from the API before believing a step back (a stale watch cache
    after a peering pause: tests/chaos saw Evaluating -> Pending)."""
    assert ph.goes_back(Phase.EVALUATING, Phase.PENDING) and ph.goes_back(Phase.MERGING, Phase.TRAINING)
    assert not ph.goes_back(Phase.PENDING, Phase.TRAINING) and not ph.goes_back(
        Phase.TRAINING, Phase.TRAINING
    )
    assert not ph.goes_back(None, Phase.PENDING)
    assert not ph.goes_back(Phase.SUSPENDED, Phase.PENDING)  # resuming starts over from Pending
    assert not ph.goes_back(Phase.TRAINING, Phase.SUSPENDED) and not ph.goes_back(Phase.MERGING, Phase.FAILED)
    # Curating sits between Pending and Training; the train Job's Pending (curation done) after Curating
    assert not ph.goes_back(Phase.PENDING, Phase.CURATING) and not ph.goes_back(
        Phase.CURATING, Phase.TRAINING
    )
    assert ph.goes_back(Phase.TRAINING, Phase.CURATING) and ph.goes_back(Phase.EVALUATING, Phase.CURATING)
    assert ph.goes_back(Phase.CURATING, Phase.PENDING)  # a view without the curate Job: stale
    assert not ph.goes_back(Phase.CURATING, Phase.PENDING, curated=True)  # the train Job's pods pending
    assert ph.goes_back(Phase.TRAINING, Phase.PENDING, curated=True)
    obs = observed(stages=CURATED, curate=CURATED_DONE, train=job(active=1))
    assert not ph.goes_back(Phase.CURATING, ph.next_phase(obs).phase, ph.curation_done(obs))


def test_own_suspend_writes_until_the_watch_shows_them() -> None:
    """A quick suspend/resume (tests/chaos): the watch cache does not show the operator's own suspend of the
    Job yet, so the Job must read as suspended (to be lifted at once), not as running with a leftover pod."""
    import time

    from sftjob_operator.handlers.children import RECREATE_AFTER_S, own_suspend_writes
    from sftjob_operator.handlers.state import Memo

    memo = Memo(suspended={"x-train": (True, time.monotonic())})
    seen = {Stage.TRAIN: job(active=1)}
    assert own_suspend_writes(seen, memo)[Stage.TRAIN].suspended is True
    assert "x-train" in memo.suspended
    # once the watch shows it, the observation is all there is
    assert own_suspend_writes({Stage.TRAIN: job(suspended=True)}, memo)[Stage.TRAIN].suspended is True
    assert memo.suspended == {}
    # an old write that never showed (someone else changed it since): the observation wins
    memo.suspended["x-train"] = (True, time.monotonic() - RECREATE_AFTER_S)
    assert own_suspend_writes(seen, memo)[Stage.TRAIN].suspended is False
