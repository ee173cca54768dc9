"""What a user watching a run sees at once (render/user_view.py): an unschedulable rank as a condition with
the scheduler's message, and `kubectl get sft` progress columns without made-up zeros — before the first
step (the trainer's own exporter, read by the operator's parser) and during a group restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import generate_latest

from sftjob_api import Phase, Stage, parse_spec
from sftjob_operator.render import phase as ph
from sftjob_operator.render.conditions import get_condition
from sftjob_operator.render.names import COMPLETION_INDEX_LABEL, LABEL_STAGE, ChildNames
from sftjob_operator.render.observe import JobObs, observe_pod
from sftjob_operator.render.progress import parse_progress
from sftjob_operator.render.status import build_status, parse_status
from sftjob_operator.render.user_view import shown_progress, unschedulable_condition
from sftjob_trainer.metrics import TrainerMetrics

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SCHEDULER = (
    "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption"
)
SPEC = parse_spec(
    {
        "model": {"uri": "s3://models/m"},
        "dataset": {"train": ["s3://data/t.jsonl"]},
        "output": {"uri": "s3://out/runs"},
        "resources": {"nodes": 2, "gpusPerNode": 0},
        "training": {"globalBatchSize": 8, "microBatchSize": 4},
    }
)


def train_pod(index: int, scheduled: bool, phase: str = "Pending") -> dict[str, object]:
    """A trainer pod as the apiserver returns it (PodScheduled written by the real scheduler's rules)."""
    cond = (
        {"type": "PodScheduled", "status": "True"}
        if scheduled
        else {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHEDULER}
    )
    return {
        "metadata": {
            "name": f"run-train-{index}-abcde",
            "creationTimestamp": "2026-01-01T11:59:50Z",
            "labels": {LABEL_STAGE: "train"},
            "annotations": {COMPLETION_INDEX_LABEL: str(index)},
        },
        "status": {"phase": phase, "conditions": [cond]},
    }


def observed(*pods: dict[str, object]) -> list:
    return [observe_pod(p, LABEL_STAGE, COMPLETION_INDEX_LABEL) for p in pods]


def test_an_unschedulable_rank_is_a_condition_with_the_schedulers_message_at_once() -> None:
    # rank 0 runs, rank 1 cannot be placed: seconds after creation, long before Stuck's timeout
    pods = observed(train_pod(0, True, "Running"), train_pod(1, False))
    conds = unschedulable_condition([], pods, NOW, 1)
    cond = get_condition(conds, "Unschedulable")
    assert cond is not None and (cond.status, cond.reason) == ("True", "Unschedulable")
    assert cond.message == f"cannot be scheduled: train rank 1 (pod run-train-1-abcde): {SCHEDULER}"

    # scheduled later: False, saying what it was; the transition time moves once
    later = NOW + timedelta(seconds=30)
    conds = unschedulable_condition(conds, observed(train_pod(0, True), train_pod(1, True)), later, 1)
    cond = get_condition(conds, "Unschedulable")
    assert cond is not None and (cond.status, cond.reason) == ("False", "Scheduled")
    assert SCHEDULER in cond.message and cond.last_transition_time == later
    assert unschedulable_condition(conds, [], later + timedelta(seconds=9), 1) == conds


def test_a_run_whose_pods_were_always_scheduled_has_no_such_condition() -> None:
    pods = observed(train_pod(0, True, "Running"), train_pod(1, True, "Running"))
    assert unschedulable_condition([], pods, NOW, 1) == []


def test_a_deleted_pod_waiting_for_the_scheduler_is_not_reported() -> None:
    gone = train_pod(1, False)
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:59Z"  # type: ignore[index]
    assert unschedulable_condition([], observed(gone), NOW, 1) == []


def page(tm: TrainerMetrics) -> str:
    return generate_latest(tm.registry).decode()


def test_no_loss_eta_or_progress_before_the_first_step() -> None:
    """The trainer's exporter before its first step: step 0, and loss/ETA gauges at their initial 0."""
    tm = TrainerMetrics("ns", "run", 0, None)
    tm.total_steps.set(120)
    tm.step.set(0)
    before = parse_progress(page(tm), NOW)
    assert before is not None and before.step == 0  # hang detection still sees the step
    assert (before.summary, before.loss, before.eta, before.tokens_per_second) == (None, None, None, None)

    tm.step.set(1), tm.loss.set(2.25), tm.eta.set(95), tm.tps.set(410.0)
    first = parse_progress(page(tm), NOW)
    assert first is not None and (first.summary, first.loss, first.eta) == ("1/120 (0.8%)", 2.25, "1m35s")


def test_after_a_resume_the_checkpoints_step_shows_without_a_loss_until_a_step_is_done() -> None:
    tm = TrainerMetrics("ns", "run", 0, None)
    tm.total_steps.set(120)
    tm.resumed_step.set(30)
    tm.step.set(30)
    resumed = parse_progress(page(tm), NOW)
    assert resumed is not None and (resumed.summary, resumed.loss, resumed.eta) == (
        "30/120 (25%)",
        None,
        None,
    )
    tm.step.set(31), tm.loss.set(1.5), tm.eta.set(60)
    stepped = parse_progress(page(tm), NOW)
    assert stepped is not None and (stepped.loss, stepped.eta) == (1.5, "1m00s")


def test_columns_say_restarting_during_a_group_restart_then_the_new_groups_reading() -> None:
    old_group = {"step": 40, "totalSteps": 120, "percent": 33.3, "summary": "40/120 (33.3%)", "loss": 1.2}
    prev = parse_status({"phase": "Training", "progress": {**old_group, "eta": "3m00s"}})
    meta = {"namespace": "ns", "name": "run", "creationTimestamp": "2026-01-01T11:00:00Z"}
    torn_down = JobObs(name="run-train", deleting=True)
    obs = ph.Observed(
        phase=Phase.TRAINING, jobs={Stage.TRAIN: torn_down}, group_restart="tearing down the training group"
    )
    decision = ph.next_phase(obs)
    status = build_status(meta, prev, SPEC, decision, obs, None, None, NOW, 1, ChildNames("run"))
    p = status.progress
    assert p is not None and (p.summary, p.loss, p.eta) == ("Restarting", None, None)
    assert p.step == 40  # the recovery records the step it failed at from here

    running = JobObs(name="run-train", active=2, ready=2)
    obs = ph.Observed(phase=Phase.TRAINING, jobs={Stage.TRAIN: running}, running_group_pods=2)
    fresh = prev.model_copy(
        update={"progress": prev.progress.model_copy(update={"summary": "31/120 (25.8%)"})}
    )
    status = build_status(meta, fresh, SPEC, ph.next_phase(obs), obs, None, None, NOW, 1, ChildNames("run"))
    assert status.progress is not None and status.progress.summary == "31/120 (25.8%)"


def test_a_group_that_restarted_after_its_last_step_and_completed_shows_every_step_done() -> None:
    # Seen on a loaded machine: the group failed after step 12 of 12, the new group resumed and finished
    # before the progress reader's next reading; `kubectl get sft` then said Succeeded ... Restarting.
    last = {"step": 12, "totalSteps": 12, "percent": 100.0, "summary": "Restarting"}
    prev = parse_status({"phase": "Training", "reason": "Restarting", "progress": last})
    meta = {"namespace": "ns", "name": "run", "creationTimestamp": "2026-01-01T11:00:00Z"}
    done = JobObs(name="run-train", succeeded=2, completions=2, complete=True)
    obs = ph.Observed(phase=Phase.TRAINING, jobs={Stage.TRAIN: done})
    status = build_status(meta, prev, SPEC, ph.next_phase(obs), obs, None, None, NOW, 1, ChildNames("run"))
    assert status.progress is not None and status.progress.summary == "12/12 (100%)"


def test_the_status_patch_deletes_what_the_new_progress_no_longer_has() -> None:
    """A JSON merge patch keeps keys it does not mention: the blanked LOSS/ETA must be patched to null (seen
    on the real node: `Restarting` beside the old group's loss and ETA)."""
    from sftjob_operator.render.status import status_patch

    progress = {"step": 3, "summary": "3/12 (25%)", "loss": 0.1, "eta": "3m"}
    stored = parse_status({"phase": "Training", "progress": progress}).model_dump(
        mode="json", exclude_none=True
    )
    new = parse_status(stored)
    new.progress = shown_progress(new.progress, "Restarting")
    patch = status_patch(stored, new)
    assert patch == {"progress": {"step": 3, "summary": "Restarting", "loss": None, "eta": None}}
    assert status_patch(stored, parse_status(stored)) == {}  # unchanged: nothing written
