"""Kueue's partial admission of an elastic training group (render/admission.py, docs/kueue.md "Partial
admission"): the train Job rendered for it, the pure decision once Kueue admitted P pods, the status at the
admitted size, and the trainer's launcher ending a pod that has no rank. The run on Kueue's own controller is
tests/operator/test_kueue_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sftjob_api import SFTJobStatus, Stage, parse_spec
from sftjob_operator.handlers.state import slim_job, slim_pod
from sftjob_operator.render import phase as ph
from sftjob_operator.render.admission import plan_admission
from sftjob_operator.render.elastic import spec_at
from sftjob_operator.render.names import COMPLETION_INDEX_LABEL, LABEL_STAGE
from sftjob_operator.render.objects import RenderOptions, SFTJobRef, render_stage_job
from sftjob_operator.render.observation import observe, render_status
from sftjob_operator.render.observe import JobObs, PodObs, observe_job, observe_pod
from sftjob_trainer.__main__ import outside_group

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
QUEUED = SFTJobRef(
    name="el", namespace="team-a", uid="uid-1", labels=(("kueue.x-k8s.io/queue-name", "team"),)
)
PLAIN = SFTJobRef(name="el", namespace="team-a", uid="uid-1")
GATE = {"name": "sft.tuning.dev/group-size"}


def spec(elastic: bool = True, global_batch: int = 32, nodes: int = 4) -> Any:
    """4 GPUs a node, micro batch 1: global batch 32 divides 2 and 4 nodes (8, 16 ranks), not 3 (12)."""
    return parse_spec({
        "model": {"uri": "s3://models/smollm2-135m-instruct"},
        "dataset": {"train": ["s3://datasets/alpaca-sample.jsonl"]},
        "output": {"uri": "s3://artifacts/sft", "credentialsSecret": {"name": "s3"}},
        "resources": {"nodes": nodes, "gpusPerNode": 4},
        "training": {"microBatchSize": 1, "globalBatchSize": global_batch},
        "runPolicy": {"elastic": {"minNodes": 2, "maxNodes": 4}} if elastic else {},
    })  # fmt: skip


def container(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"]["containers"][0])


def test_an_elastic_run_under_kueue_asks_for_partial_admission_with_the_size_left_open() -> None:
    job = render_stage_job(Stage.TRAIN, QUEUED, spec(), RenderOptions())
    assert job["metadata"]["annotations"] == {
        "kueue.x-k8s.io/job-min-parallelism": "2",  # the smallest size the global batch divides
        "kueue.x-k8s.io/job-completions-equal-parallelism": "true",  # one group, never waves
    }
    assert (job["spec"]["parallelism"], job["spec"]["completions"], job["spec"]["suspend"]) == (4, 4, True)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["template"]["spec"]["schedulingGates"] == [GATE]
    assert "--nnodes=$(SFTJOB_NNODES)" in container(job)["command"]
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["SFTJOB_NNODES"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['sft.tuning.dev/nnodes']"}
    }
    obs = observe_job(slim_job(job))  # what the operator's watch index keeps is enough to decide on
    assert (obs.min_parallelism, obs.parallelism, obs.nodes) == (2, 4, 4)

    # Everything else renders as before: the size fixed in the command, no gate, no Kueue annotation.
    whole = [
        render_stage_job(Stage.TRAIN, PLAIN, spec(), RenderOptions()),  # elastic, no Kueue
        render_stage_job(Stage.TRAIN, QUEUED, spec(elastic=False), RenderOptions()),  # Kueue, fixed size
        render_stage_job(Stage.TRAIN, QUEUED, spec_at(spec(), 2), RenderOptions()),  # already at minNodes
    ]
    for other in whole:
        nodes = other["spec"]["parallelism"]
        assert f"--nnodes={nodes}" in container(other)["command"]
        assert (
            "annotations" not in other["metadata"]
            and "schedulingGates" not in other["spec"]["template"]["spec"]
        )
        assert "SFTJOB_NNODES" not in {e["name"] for e in container(other)["env"]}
    assert "annotations" not in render_stage_job(Stage.EVAL, QUEUED, spec(), RenderOptions())["metadata"]


def admitted_job(parallelism: int, label: int = 4, suspended: bool = False) -> JobObs:
    """The train Job after Kueue's RunWithPodSetsInfo: parallelism = completions = the admitted count."""
    return JobObs(name="el-train", uid="job-1", nodes=label, gpus_per_node=4, completions=parallelism,
                  parallelism=parallelism, min_parallelism=2, suspended=suspended)  # fmt: skip


def gated_pod(index: int, gated: bool = True) -> PodObs:
    raw = {
        "metadata": {
            "name": f"el-train-{index}-x",
            "labels": {LABEL_STAGE: "train", COMPLETION_INDEX_LABEL: str(index)},
            "creationTimestamp": (NOW - timedelta(seconds=2)).isoformat(),
        },
        "spec": {"schedulingGates": [GATE, {"name": "other.example/gate"}] if gated else []},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                       "reason": "SchedulingGated"}]},
    }  # fmt: skip
    return observe_pod(slim_pod(raw), LABEL_STAGE, COMPLETION_INDEX_LABEL)


def test_the_group_takes_the_largest_allowed_size_kueue_admitted() -> None:
    pods = [gated_pod(0), gated_pod(1), gated_pod(2, gated=False)]
    three = plan_admission(spec(), admitted_job(3), pods)  # 3 is no allowed size: the group runs at 2
    assert three is not None and (three.nodes, three.open, three.relabel) == (
        2,
        ("el-train-0-x", "el-train-1-x"),  # the pods still gated (one was opened already)
        True,
    )
    assert three.message.endswith(
        "starts at 2 node(s); 1 more pod(s) exit at once (no allowed size uses them)"
    )
    full = plan_admission(spec(), admitted_job(4), [])
    assert full is not None and (full.nodes, full.relabel) == (4, False)
    relabelled = plan_admission(spec(), admitted_job(2, label=2), [])
    assert relabelled is not None and not relabelled.relabel
    # not admitted (suspended), or admitted whole: nothing to do
    assert plan_admission(spec(), admitted_job(4, suspended=True), pods) is None
    whole = JobObs(name="el-train", nodes=4, parallelism=4, completions=4)
    assert plan_admission(spec(), whole, pods) is None


def test_the_status_shows_the_admitted_size_and_no_resize_undoes_it() -> None:
    """The first reconcile after Kueue admitted 2 of 4: status.nodes still says 4 (the size asked for)."""
    prev = SFTJobStatus.model_validate({"phase": "Pending", "reason": "Queued", "nodes": 4, "worldSize": 16})
    pods = [gated_pod(0), gated_pod(1)]
    obs = observe(prev, spec(), None, None, True, {Stage.TRAIN: admitted_job(2)}, pods, None, None, {}, NOW)
    assert obs.admitted is not None and obs.admitted.nodes == 2 and obs.admitted.relabel
    assert obs.restart.delete is None and not obs.restart.status.recoveries  # a start, not a recovery
    decision = ph.next_phase(obs.phase)
    meta = {"name": "el", "namespace": "team-a", "creationTimestamp": "2026-12-07T09:00:00Z"}
    st = render_status(meta, obs, decision, NOW, 1)
    assert (st.nodes, st.world_size) == (2, 8)
    # the next reconciles (label set, pods opened): the same size, nothing more to do
    after = observe(st, spec(), None, None, True, {Stage.TRAIN: admitted_job(2, label=2)},
                    [gated_pod(0, gated=False), gated_pod(1, gated=False)], None, None, {}, NOW)  # fmt: skip
    assert after.admitted is not None and (after.admitted.open, after.admitted.relabel) == ((), False)
    assert after.restart.delete is None


def test_a_pod_without_a_rank_in_the_group_ends_at_once() -> None:
    args = ["--nnodes=2", "--nproc-per-node=4", "--master-addr=a", "--master-port=1"]
    assert (
        outside_group([*args, "--node-rank=2"])
        == "node rank 2 is outside the group of 2 node(s): nothing to run"
    )
    assert outside_group([*args, "--node-rank=1"]) is None
    assert outside_group(["--nnodes=1", "--nproc-per-node=1"]) is None  # one node: torchrun's default rank
