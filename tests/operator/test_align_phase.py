"""The align stage (spec.alignment) as the operator's second group stage, pure: the Jobs are the real
renderers' output with the status the Job controller would give them, the pods as the kubelet reports them;
observe -> decide -> status runs as one reconcile does. No cluster (tests/operator/test_align_e2e.py runs
the same on the test bed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sftjob_api import Phase, Reason, SFTJobStatus, Stage, parse_spec
from sftjob_api.layout import checkpoint_uri
from sftjob_api.status import Artifacts, Progress
from sftjob_operator.cluster_cli import default_stage
from sftjob_operator.render import phase as ph
from sftjob_operator.render.names import COMPLETION_INDEX_LABEL
from sftjob_operator.render.objects import RenderOptions, SFTJobRef, render_service, render_stage_job
from sftjob_operator.render.observation import children_of, observe, render_status
from sftjob_operator.render.recovery import StepClock, stall_now, with_downtime

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SPEC = parse_spec(
    {
        "model": {"uri": "s3://models/base"},
        "dataset": {"train": ["s3://data/train.jsonl"]},
        "output": {"uri": "s3://out/sft"},
        "resources": {"nodes": 2, "gpusPerNode": 1},
        "training": {"globalBatchSize": 16, "microBatchSize": 4},
        "alignment": {"dataset": {"train": ["s3://data/prefs.jsonl"]}},
        "runPolicy": {"backoffLimit": 2},
    }
)
REF = SFTJobRef(name="run", namespace="team-a", uid="sftjob-uid")
META = {
    "name": REF.name,
    "namespace": REF.namespace,
    "uid": REF.uid,
    "creationTimestamp": "2026-01-01T10:00:00Z",
}
Obj = dict[str, Any]


def stage_job(stage: Stage, uid: str, **status: Any) -> Obj:
    """The operator's own Job of `stage` as the Job controller reports it (`status`: its status)."""
    job = render_stage_job(stage, REF, SPEC, RenderOptions())
    job["metadata"]["uid"] = uid
    job["status"] = status
    return job


def done(stage: Stage) -> Obj:
    return stage_job(stage, f"{stage}-uid", succeeded=2, conditions=[{"type": "Complete", "status": "True"}])


def rank(job: Obj, index: int, phase: str, exit_code: int | None = None, message: str = "") -> Obj:
    tmeta = job["spec"]["template"]["metadata"]
    state = {"terminated": {"exitCode": exit_code, "message": message}} if exit_code is not None else {}
    return {
        "metadata": {
            "name": f"{job['metadata']['name']}-{index}-x",
            "labels": {**tmeta["labels"], COMPLETION_INDEX_LABEL: str(index)},
            "ownerReferences": [
                {"uid": job["metadata"]["uid"], "kind": "Job", "name": job["metadata"]["name"]}
            ],
            "creationTimestamp": "2026-01-01T11:00:00Z",
        },
        "status": {
            "phase": phase,
            "podIP": f"127.0.0.{10 + index}",
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def reconcile(prev: SFTJobStatus, jobs: list[Obj], pods: list[Obj], suspend: bool = False) -> SFTJobStatus:
    """One reconcile's view, decision and status of these children."""
    spec = SPEC.model_copy(update={"suspend": suspend})
    kids = children_of(REF.uid, jobs, pods)
    obs = observe(prev, spec, None, None, False, kids.jobs, kids.pods, None, None, {}, NOW)
    return render_status(META, obs, ph.next_phase(obs.phase), NOW, 1)


def condition(st: SFTJobStatus, ctype: str) -> tuple[str, str]:
    c = next(c for c in st.conditions if c.type == ctype)
    return c.status, c.reason


def test_phases_go_training_aligning_evaluating_and_each_stage_creates_the_next() -> None:
    running_train = stage_job(Stage.TRAIN, "train-uid", active=2, ready=2)
    st = reconcile(SFTJobStatus(phase=Phase.PENDING), [running_train], [])
    assert (st.phase, condition(st, "Training")) == (Phase.TRAINING, ("True", "PodsRunning"))
    assert [c.type for c in st.conditions if c.type == "Aligned"] == []  # not yet begun
    # Training done: the align Job is the one to create; while its pods start the run says Aligning (a later
    # group never goes back to Pending: the phases only move forward).
    kids = children_of(REF.uid, [done(Stage.TRAIN)], [])
    obs = observe(st, SPEC, None, None, False, kids.jobs, kids.pods, None, None, {}, NOW)
    assert ph.stage_to_create(obs.phase) == Stage.ALIGN
    assert reconcile(st, [done(Stage.TRAIN)], []).message == "training complete; creating the alignment Job"
    starting = stage_job(Stage.ALIGN, "align-uid", active=2)
    st = reconcile(st, [done(Stage.TRAIN), starting], [])
    assert (st.phase, st.reason) == (Phase.ALIGNING, Reason.PODS_PENDING)
    assert not ph.goes_back(Phase.TRAINING, st.phase)
    assert condition(st, "Training") == ("False", "TrainingCompleted")
    assert condition(st, "Aligned") == ("False", "PodsPending")
    assert st.children is not None and st.children.align_job == "run-align"
    running = stage_job(Stage.ALIGN, "align-uid", active=2, ready=2)
    st = reconcile(
        st, [done(Stage.TRAIN), running], [rank(running, 0, "Running"), rank(running, 1, "Running")]
    )
    assert (st.phase, st.reason, st.message) == (Phase.ALIGNING, "PodsRunning", "2/2 trainer pod(s) running")
    kids = children_of(REF.uid, [done(Stage.TRAIN), done(Stage.ALIGN)], [])
    obs = observe(st, SPEC, None, None, False, kids.jobs, kids.pods, None, None, {}, NOW)
    assert ph.stage_to_create(obs.phase) == Stage.EVAL
    paused = reconcile(st, [done(Stage.TRAIN), done(Stage.ALIGN)], [], suspend=True)
    assert paused.phase == Phase.SUSPENDED
    assert paused.message == "alignment done; evaluation waits for spec.suspend"
    st = reconcile(st, [done(Stage.TRAIN), done(Stage.ALIGN)], [])
    assert (st.phase, condition(st, "Aligned")) == (Phase.EVALUATING, ("True", "AlignmentCompleted"))
    # the message names the stage that completed just before evaluation (without alignment: training)
    assert st.message == "alignment complete; starting evaluation"
    assert ph.goes_back(Phase.EVALUATING, Phase.ALIGNING) and ph.goes_back(Phase.ALIGNING, Phase.TRAINING)


def test_the_align_group_is_launched_like_training_with_its_own_rendezvous() -> None:
    job = render_stage_job(Stage.ALIGN, REF, SPEC, RenderOptions())
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["backoffLimit"]) == ("Indexed", 2, 0)
    assert (
        spec["podFailurePolicy"]
        == render_stage_job(Stage.TRAIN, REF, SPEC, RenderOptions())["spec"]["podFailurePolicy"]
    )
    pod = spec["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "run-align-0.run-align" and pod["subdomain"] == "run-align"
    assert pod["containers"][0]["command"][-3:] == ["align", "--config", "/etc/sftjob/config.yaml"]
    svc = render_service(REF, Stage.ALIGN)
    assert svc["metadata"]["name"] == "run-align"
    assert svc["spec"]["selector"] == spec["template"]["metadata"]["labels"] | svc["spec"]["selector"]
    assert svc["spec"]["selector"]["sft.tuning.dev/stage"] == "align"  # the align ranks, not training's


def test_a_failed_align_rank_restarts_the_align_group_and_counts_once() -> None:
    prev = SFTJobStatus(
        phase=Phase.ALIGNING,
        progress=Progress(step=12, total_steps=50, stage="align"),
        artifacts=Artifacts(
            root="s3://out/sft/team-a/run/",
            latest_checkpoint=checkpoint_uri(SPEC, "team-a", "run", REF.uid, 10, Stage.ALIGN),
        ),
    )
    failed = stage_job(
        Stage.ALIGN,
        "align-1",
        failed=1,
        conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "x"}],
    )
    pods = [rank(failed, 1, "Failed", 137), rank(failed, 0, "Failed", 1, "Connection closed by peer")]
    kids = children_of(REF.uid, [done(Stage.TRAIN), failed], pods)
    obs = observe(prev, SPEC, None, None, False, kids.jobs, kids.pods, None, None, {}, NOW)
    assert obs.restart.delete is not None and obs.restart.delete.name == "run-align"
    st = render_status(META, obs, ph.next_phase(obs.phase), NOW, 1)
    assert (st.phase, st.reason) == (Phase.ALIGNING, Reason.RESTARTING)
    [rec] = st.recoveries
    assert (rec.stage, rec.train_job_uid, rec.resumed_from_step, rec.steps_lost) == (
        "align",
        "align-1",
        10,
        2,
    )
    assert "run-align-1-x (rank 1)" in rec.cause and st.restarts == 1
    kept = checkpoint_uri(SPEC, "team-a", "run", REF.uid, 10, Stage.ALIGN)
    assert kept == "s3://out/sft/team-a/run/align/checkpoints/sftjob-uid/step-10/"
    assert st.artifacts is not None and st.artifacts.latest_checkpoint == kept  # align's, under align/
    # the torn-down Job gone: the alignment group is re-created, not training
    kids = children_of(REF.uid, [done(Stage.TRAIN)], [])
    obs = observe(st, SPEC, None, None, False, kids.jobs, kids.pods, None, None, {}, NOW)
    assert ph.stage_to_create(obs.phase) == Stage.ALIGN
    assert obs.phase.group_restart is not None and "alignment group" in obs.phase.group_restart
    # the align group's first step after the restart fills its downtime; a training step would not
    later = NOW + timedelta(seconds=30)
    assert with_downtime(st, 11, later, Stage.TRAIN) is None
    timed = with_downtime(st, 11, later, Stage.ALIGN)
    assert timed is not None and timed.recoveries[-1].downtime_seconds == 30.0


def test_align_ends_failed_alignment_failed_in_the_ranks_words() -> None:
    said = "prefs.jsonl:3: chosen equals rejected (1 of 1 pairs dropped)"
    rule = "Container trainer for pod team-a/run-align-1-x failed with exit code 2 matching FailJob rule"
    failed = stage_job(
        Stage.ALIGN,
        "align-1",
        failed=2,
        conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": rule}],
    )
    pods = [rank(failed, 0, "Failed", 143, "SIGTERM: stopped"), rank(failed, 1, "Failed", 2, said)]
    st = reconcile(SFTJobStatus(phase=Phase.ALIGNING), [done(Stage.TRAIN), failed], pods)
    assert (st.phase, st.reason) == (Phase.FAILED, Reason.ALIGNMENT_FAILED)
    assert said in st.message and "exit code 2" in st.message, st.message
    assert condition(st, "Aligned") == ("False", "AlignmentFailed")
    assert condition(st, "Failed") == ("True", "AlignmentFailed") and not st.recoveries  # no restart
    assert default_stage(st.model_dump(mode="json", by_alias=True)) == "align"  # `sftjob logs` reads align


def test_suspend_while_aligning_waits_for_the_checkpoint_then_resumes_aligning() -> None:
    running = stage_job(Stage.ALIGN, "align-uid", active=2, ready=2)
    ranks = [rank(running, 0, "Running"), rank(running, 1, "Running")]
    prev = SFTJobStatus(phase=Phase.ALIGNING)
    st = reconcile(prev, [done(Stage.TRAIN), running], ranks, suspend=True)
    assert (st.phase, st.reason) == (Phase.ALIGNING, Reason.SUSPENDING)  # SIGTERM: saving a checkpoint
    held = stage_job(Stage.ALIGN, "align-uid")
    held["spec"]["suspend"] = True
    st = reconcile(st, [done(Stage.TRAIN), held], [], suspend=True)
    assert (st.phase, st.reason) == (Phase.SUSPENDED, Reason.SUSPENDED)
    assert st.message.startswith("alignment suspended by spec.suspend")
    # resumed: the Job runs again, its pods not yet; a later group waits in its own phase, not Pending
    st = reconcile(st, [done(Stage.TRAIN), stage_job(Stage.ALIGN, "align-uid", active=2)], [])
    assert (st.phase, st.reason) == (Phase.ALIGNING, Reason.PODS_PENDING)


def test_align_progress_replaces_training_progress_and_stalls_are_judged_while_aligning() -> None:
    trained = Progress(step=100, total_steps=100, summary="100/100 (100%)", loss=0.9)
    st = reconcile(
        SFTJobStatus(phase=Phase.TRAINING, progress=trained),
        [done(Stage.TRAIN), stage_job(Stage.ALIGN, "a")],
        [],
    )
    assert st.progress is None  # training's steps are not the alignment's
    aligning = Progress(step=7, total_steps=50, summary="7/50 (14%)", stage="align")
    st = reconcile(st.model_copy(update={"progress": aligning}), [done(Stage.TRAIN), done(Stage.ALIGN)], [])
    assert st.progress is not None and (st.progress.step, st.progress.stage) == (50, "align")  # it completed
    clock = StepClock("align-uid", [(NOW - timedelta(seconds=2000), 7)])
    running = children_of(REF.uid, [stage_job(Stage.ALIGN, "align-uid", active=2, ready=2)], []).jobs[
        Stage.ALIGN
    ]
    stall = stall_now(clock, running, 2, "Aligning", False, SPEC.run_policy, NOW, Stage.ALIGN)
    assert stall is not None and stall.step == 7
    assert stall_now(clock, running, 2, "Training", False, SPEC.run_policy, NOW, Stage.ALIGN) is None
