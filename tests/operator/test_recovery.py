"""Unit tests of group recovery (render/recovery.py): the train Job's shape, failure causes, counting against
backoffLimit, hang detection, lost-work accounting, and the phases a restart goes through."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from sftjob_api import SFTJobStatus, SpecError, Stage, parse_spec
from sftjob_api.run_policy import RunPolicy
from sftjob_api.status import MAX_RECOVERIES, Artifacts, Progress, Recovery
from sftjob_operator.render import objects as o
from sftjob_operator.render import phase as ph
from sftjob_operator.render.observe import JobObs, PodObs, observe_pod
from sftjob_operator.render.recovery import (
    CAUSE_KINDS,
    Failure,
    Stall,
    StepClock,
    cause_kind,
    checkpoint_step_of,
    classify_failure,
    detect_stall,
    median_step_seconds,
    plan_restart,
    record_recovery,
    stall_now,
    stalled_condition,
    with_downtime,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
CKPT = "s3://b/sft/ns/run/checkpoints/0c5e-uid/step-40/"
SPEC = {
    "model": {"uri": "s3://models/base"},
    "dataset": {"train": ["s3://data/train.jsonl"]},
    "output": {"uri": "s3://out/sft"},
    "resources": {"nodes": 2, "gpusPerNode": 1},
    "training": {"globalBatchSize": 16, "microBatchSize": 4},
}


def failed_job(uid: str = "job-1") -> JobObs:
    return JobObs(name="run-train", uid=uid, failed=2, completions=2, failed_reason="BackoffLimitExceeded")


def pod(name: str, index: int, phase: str = "Failed", **kw: object) -> PodObs:
    return PodObs(name=name, stage="train", phase=phase, created=NOW, index=index, **kw)  # type: ignore[arg-type]


def training(restarts: int = 0, step: int | None = 57) -> SFTJobStatus:
    return SFTJobStatus(
        phase="Training",  # type: ignore[arg-type]
        restarts=restarts,
        progress=Progress(step=step) if step is not None else None,
        artifacts=Artifacts(latest_checkpoint=CKPT),
    )


# ---- the train Job's shape ----------------------------------------------------------------------------------


def test_train_job_fails_on_the_first_pod_failure_and_eval_merge_keep_their_retries() -> None:
    ref = o.SFTJobRef(name="run", namespace="ns", uid="u")
    spec = parse_spec({**SPEC, "runPolicy": {"backoffLimit": 4}})
    train = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())["spec"]
    # backoffLimit 0: the Job controller stops every surviving rank at once; the operator restarts the group
    assert train["backoffLimit"] == 0
    assert [r["action"] for r in train["podFailurePolicy"]["rules"]] == ["FailJob"]  # no Ignore: see below
    ev = o.render_stage_job(Stage.EVAL, ref, spec, o.RenderOptions())["spec"]
    assert ev["backoffLimit"] == 2
    assert [r["action"] for r in ev["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore"]


def test_run_policy_fields_have_defaults_in_minutes_and_name_the_field_when_bad() -> None:
    p = RunPolicy()
    assert p.collective_timeout_seconds == 300 and p.stall_factor == 10 and p.stall_floor_seconds == 600
    for bad in ({"collectiveTimeoutSeconds": 1}, {"stallFactor": -1}, {"stallFloorSeconds": 5}):
        with pytest.raises(SpecError) as e:
            parse_spec({**SPEC, "runPolicy": bad})
        assert f"spec.runPolicy.{next(iter(bad))}" in str(e.value.errors), e.value.errors


# ---- causes -------------------------------------------------------------------------------------------------


def test_the_failed_rank_is_the_cause_not_the_survivors_torn_down_after_it() -> None:
    pods = [
        pod("run-train-0-abc", 0, deleting=True, exit_code=143),  # survivor, terminated by the Job controller
        pod("run-train-1-def", 1, exit_code=1, terminated_reason="Error"),
    ]
    assert classify_failure(pods) == Failure("pod run-train-1-def (rank 1) exit code 1", True)


def test_oom_and_disruption_causes() -> None:
    oom = classify_failure([pod("p-0", 0, exit_code=137, terminated_reason="OOMKilled")])
    assert oom == Failure("pod p-0 (rank 0) OOMKilled, exit code 137", True)
    raw = {
        "metadata": {"name": "p-1", "labels": {"sft.tuning.dev/stage": "train"}},
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            "conditions": [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "x",
                }
            ],
        },
    }
    evicted = observe_pod(raw, "sft.tuning.dev/stage", "idx")
    assert evicted.disruption == "PreemptionByScheduler: x" and evicted.reason == "Evicted"
    # a disruption anywhere in the group: not counted, even though another rank crashed because of it
    f = classify_failure([pod("p-0", 0, exit_code=1), evicted])
    assert not f.counted and "p-1" in f.cause and "PreemptionByScheduler" in f.cause
    # ... also while the evicted rank is still terminating (checkpointing) and another rank failed first
    terminating = pod("p-1", 1, phase="Running", deleting=True, disruption="EvictionByEvictionAPI: drain")
    f = classify_failure([pod("p-0", 0, exit_code=143), terminating])
    assert not f.counted and "EvictionByEvictionAPI" in f.cause


# ---- counting and accounting --------------------------------------------------------------------------------


def test_a_failed_group_is_recorded_once_with_steps_lost_and_counted_once() -> None:
    policy = RunPolicy(backoff_limit=2)
    pods = [pod("run-train-1-x", 1, exit_code=1)]
    plan = plan_restart(training(), policy, failed_job(), pods, None, NOW)
    assert plan.delete is not None and plan.delete.uid == "job-1"
    assert plan.status.restarts == 1  # one failure of a 2-rank group: +1, not +2
    [rec] = plan.status.recoveries
    assert (rec.failed_step, rec.resumed_from_step, rec.steps_lost) == (57, 40, 17)
    assert rec.counted and rec.train_job_uid == "job-1" and rec.downtime_seconds is None
    assert plan.group_restart is not None and "from step 40" in plan.group_restart
    assert "restart 1/2" in plan.group_restart and "17 step(s) lost" in plan.group_restart
    # the next reconcile sees the same failed Job (delete not observed yet): no second count, delete again
    again = plan_restart(plan.status, policy, failed_job(), pods, None, NOW + timedelta(seconds=1))
    assert again.status.restarts == 1 and len(again.status.recoveries) == 1 and again.delete is not None
    # the Job is being deleted, then gone: Training/Restarting throughout
    deleting = JobObs(name="run-train", uid="job-1", deleting=True)
    assert plan_restart(plan.status, policy, deleting, [], None, NOW).group_restart
    assert plan_restart(plan.status, policy, None, [], None, NOW).group_restart
    d = ph.next_phase(ph.Observed(phase=ph.TRAINING, group_restart="re-creating"))
    assert (d.phase, d.reason) == ("Training", "Restarting")


def test_budget_used_up_fails_and_disruptions_never_count() -> None:
    policy = RunPolicy(backoff_limit=1)
    used = record_recovery(training(), Failure("x", True), failed_job("job-0"), NOW)
    plan = plan_restart(used, policy, failed_job(), [pod("p-0", 0, exit_code=1)], None, NOW)
    assert plan.delete is None and plan.exhausted is not None
    assert "1 group restart(s) used, runPolicy.backoffLimit is 1" in plan.exhausted
    d = ph.next_phase(ph.Observed(phase=ph.TRAINING, restarts_exhausted=plan.exhausted))
    assert (d.phase, d.reason) == ("Failed", "BackoffLimitExceeded")
    disrupted = pod("p-0", 0, disruption="DeletionByTaintManager: node lost")
    plan = plan_restart(used, policy, failed_job(), [disrupted], None, NOW)
    assert plan.exhausted is None and plan.status.restarts == 1 and not plan.status.recoveries[-1].counted


def test_permanent_and_deadline_failures_are_not_restarted() -> None:
    for reason in ("PodFailurePolicy", "DeadlineExceeded"):
        job = JobObs(name="run-train", uid="j", failed_reason=reason)
        assert plan_restart(training(), RunPolicy(), job, [], None, NOW).delete is None


def test_recoveries_are_bounded_and_downtime_is_filled_by_the_first_step_after() -> None:
    st = training()
    for i in range(MAX_RECOVERIES + 3):
        st = record_recovery(st, Failure(f"c{i}", True), failed_job(f"j{i}"), NOW)
    assert len(st.recoveries) == MAX_RECOVERIES and st.recoveries[-1].cause == f"c{MAX_RECOVERIES + 2}"
    assert with_downtime(st, 40, NOW + timedelta(seconds=30)) is None  # still at the resumed checkpoint
    done = with_downtime(st, 41, NOW + timedelta(seconds=93))
    assert done is not None and done.recoveries[-1].downtime_seconds == 93.0
    assert with_downtime(done, 42, NOW + timedelta(seconds=99)) is None  # once
    assert checkpoint_step_of(CKPT) == 40 and checkpoint_step_of(None) == 0


def test_no_checkpoint_yet_loses_every_step() -> None:
    st = SFTJobStatus(progress=Progress(step=9))
    rec: Recovery = record_recovery(st, Failure("c", True), failed_job(), NOW).recoveries[-1]
    assert (rec.resumed_from_step, rec.steps_lost) == (0, 9)


# ---- hang detection -----------------------------------------------------------------------------------------


def clock(*points: tuple[int, int], uid: str = "job-1") -> StepClock:
    c = StepClock()
    for seconds, step in points:
        c.observe(uid, step, NOW + timedelta(seconds=seconds))
    return c


def test_stall_needs_k_times_the_median_step_time_and_at_least_the_floor() -> None:
    c = clock((0, 1), (10, 2), (20, 3), (30, 3), (40, 5))  # 10 s, 10 s, 5 s/step: median 10 s
    assert median_step_seconds(c.advances or []) == 10
    policy = RunPolicy(stall_factor=6, stall_floor_seconds=30)
    assert detect_stall(c, "job-1", policy, NOW + timedelta(seconds=99)) is None  # 59 s < 60 s
    stall = detect_stall(c, "job-1", policy, NOW + timedelta(seconds=101))
    assert stall is not None and stall.step == 5 and stall.threshold == 60 and round(stall.seconds) == 61
    assert "step 5 has not advanced for 61s" in stall.message
    # the floor wins over a short median; factor 0 disables; another Job attempt's clock does not count
    assert (
        detect_stall(
            c, "job-1", RunPolicy(stall_factor=1, stall_floor_seconds=600), NOW + timedelta(seconds=500)
        )
        is None
    )
    assert detect_stall(c, "job-1", RunPolicy(stall_factor=0), NOW + timedelta(days=1)) is None
    assert detect_stall(c, "job-2", policy, NOW + timedelta(days=1)) is None


def test_clock_restarts_with_a_new_attempt_or_a_lower_step() -> None:
    c = clock((0, 50), (10, 57))
    c.observe("job-2", 40, NOW + timedelta(seconds=20))
    assert c.job_uid == "job-2" and c.advances == [(NOW + timedelta(seconds=20), 40)]


def test_a_stall_restarts_the_group_counted_and_sets_the_condition() -> None:
    policy = RunPolicy(stall_factor=2, stall_floor_seconds=30)
    running = JobObs(name="run-train", uid="job-1", active=2, ready=2, completions=2)
    stall = detect_stall(clock((0, 56), (10, 57)), "job-1", policy, NOW + timedelta(seconds=45))
    assert stall is not None
    plan = plan_restart(training(), policy, running, [], stall, NOW)
    assert plan.delete is running and plan.status.restarts == 1
    assert plan.status.recoveries[-1].cause.startswith("Stalled: step 57 has not advanced for 35s")
    [cond] = stalled_condition([], plan, NOW, 1)
    assert (cond.type, cond.status, cond.reason) == (
        "Stalled",
        "True",
        "Stalled",
    ) and "step 57" in cond.message
    # the same stall seen again on the next tick (the old group still tearing down) writes nothing new
    later = detect_stall(clock((0, 56), (10, 57)), "job-1", policy, NOW + timedelta(seconds=47))
    assert later is not None and later.message != stall.message
    assert stalled_condition([cond], replace(plan, stall=later), NOW, 1) == [cond]
    # a stall at another step is news
    other = Stall(step=90, seconds=40, threshold=30)
    [moved] = stalled_condition([cond], replace(plan, stall=other), NOW, 1)
    assert moved.status == "True" and moved.message.startswith("step 90 has not advanced for 40s"), moved
    [cleared] = stalled_condition([cond], plan_restart(plan.status, policy, None, [], None, NOW), NOW, 1)
    assert (cleared.status, cleared.reason) == ("False", "Progressing")


def test_cause_kinds_label_the_recoveries_metric() -> None:
    st = training()
    for failure in (Failure("pod p (rank 0) exit code 1", True), Failure("pod p disrupted", False)):
        st = record_recovery(st, failure, failed_job(failure.cause), NOW)
    st = record_recovery(st, Failure("Stalled: step 5 ...", True), failed_job("s"), NOW)
    resized = st.recoveries[-1].model_copy(
        update={"cause": "Resized: 2 -> 1 node(s) ...", "to_world_size": 8}
    )
    st = st.model_copy(update={"recoveries": [*st.recoveries, resized]})
    kinds = ["Failed", "Disrupted", "Stalled", "Resized"]
    assert [cause_kind(r) for r in st.recoveries] == list(CAUSE_KINDS) == kinds


def test_only_a_running_training_group_is_judged_and_a_pause_restarts_the_clock() -> None:
    policy = RunPolicy(stall_factor=2, stall_floor_seconds=30)
    job = JobObs(name="run-train", uid="job-1", active=2, ready=2, completions=2)
    later = NOW + timedelta(seconds=600)
    c = clock((0, 56), (10, 57))
    assert stall_now(c, job, 2, "Training", False, policy, later) is not None
    assert stall_now(c, job, 2, "Pending", False, policy, later) is None  # e.g. queued again
    assert stall_now(c, job, 2, "Training", True, policy, later) is None  # being suspended
    assert c.advances  # neither forgets the clock...
    suspended = JobObs(name="run-train", uid="job-1", suspended=True)
    assert stall_now(c, suspended, 0, "Training", False, policy, later) is None
    assert not c.advances  # ...but a pause does: after the resume, step 57 seen again starts a new clock
    c.observe("job-1", 57, later)
    assert stall_now(c, job, 2, "Training", False, policy, later + timedelta(seconds=29)) is None
