"""Elastic runs, the operator's side (issue 24 item 2): the size rules of the API, the pure resize decision
(render/elastic.py), the group rendered at its size, the capacity probe, and the resize as a recovery."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sftjob_api import SFTJobStatus, SpecError, Stage, parse_spec
from sftjob_api.status import Recovery
from sftjob_operator.render.elastic import (
    capacity_mark,
    group_size,
    plan_resize,
    probe_size,
    render_probe_job,
    spec_at,
)
from sftjob_operator.render.objects import RenderOptions, SFTJobRef, needs_service, render_stage_job
from sftjob_operator.render.observation import observe, render_status
from sftjob_operator.render.observe import JobObs, PodObs, observe_job

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
REF = SFTJobRef(name="el", namespace="team-a", uid="uid-1", avoid_nodes=("gpu-node-3",))


def spec_dict(nodes: int = 2, elastic: dict[str, Any] | None = None, **training: Any) -> dict[str, Any]:
    return {
        "model": {"uri": "s3://models/smollm2-135m-instruct"},
        "dataset": {"train": ["s3://datasets/alpaca-sample.jsonl"]},
        "output": {"uri": "s3://artifacts/sft", "credentialsSecret": {"name": "s3"}},
        "method": {"type": "lora"},
        "resources": {"nodes": nodes, "gpusPerNode": 8},
        "training": {"microBatchSize": 1, "globalBatchSize": 48, **training},
        "runPolicy": {"elastic": elastic} if elastic is not None else {},
    }


ELASTIC = {"minNodes": 1, "maxNodes": 3, "replacementTimeoutSeconds": 30, "maxResizesPerHour": 3}


def errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(doc)
    return e.value.errors


def test_bad_elastic_bounds_name_the_field() -> None:
    assert errors(spec_dict(elastic={"minNodes": 3, "maxNodes": 2})) == [
        "spec.runPolicy.elastic.minNodes: minNodes must not exceed maxNodes"
    ]
    assert any(
        e.startswith("spec.runPolicy.elastic.minNodes: runPolicy.elastic.minNodes must not exceed")
        for e in errors(spec_dict(nodes=2, elastic={"minNodes": 3}))
    )
    assert errors(spec_dict(nodes=3, elastic={"minNodes": 1, "maxNodes": 2}))[0].startswith(
        "spec.runPolicy.elastic.maxNodes: runPolicy.elastic.maxNodes must be at least resources.nodes"
    )
    # a global batch of 48 does not divide into 5 nodes x 8 GPUs: the run could not keep it at maxNodes
    assert errors(spec_dict(nodes=2, elastic={"minNodes": 1, "maxNodes": 5}))[0].startswith(
        "spec.runPolicy.elastic.maxNodes: training.globalBatchSize must be a multiple of"
    )


def test_group_sizes_are_the_ones_the_global_batch_divides() -> None:
    assert parse_spec(spec_dict(nodes=2)).group_sizes() == (2,)
    assert parse_spec(spec_dict(nodes=2, elastic=ELASTIC)).group_sizes() == (1, 2, 3)
    # 96 = 1 x 8 x 12 = 2 x 8 x 6 = 3 x 8 x 4 = 4 x 8 x 3, but not 5 nodes
    spec = parse_spec(spec_dict(nodes=4, elastic={"minNodes": 2, "maxNodes": 6}, globalBatchSize=96))
    assert spec.group_sizes() == (2, 3, 4, 6)


def train_job(nodes: int, *, suspended: bool = False, gpus: int = 8) -> JobObs:
    return JobObs(name="el-train", uid=f"job-{nodes}", active=nodes, completions=nodes, nodes=nodes,
                  gpus_per_node=gpus, suspended=suspended)  # fmt: skip


def rank(index: int, phase: str = "Running", age: float = 60, unschedulable: str | None = None) -> PodObs:
    return PodObs(
        name=f"el-train-{index}-x",
        stage="train",
        phase=phase,
        created=NOW - timedelta(seconds=age),
        index=index,
        scheduled=unschedulable is None,
        unschedulable_message=unschedulable,
        node=None if unschedulable else f"gpu-node-{index}",
    )


NO_ROOM = (
    "0/4 nodes are available: 1 Insufficient nvidia.com/gpu, 3 node(s) didn't match Pod's node affinity."
)


def status(nodes: int, checkpoint: int = 0, step: int = 0, resizes: int = 0) -> SFTJobStatus:
    st = SFTJobStatus.model_validate({
        "phase": "Training",
        "nodes": nodes,
        "progress": {"step": step},
        "artifacts": {"latestCheckpoint": f"s3://artifacts/sft/team-a/el/checkpoints/0c5e-uid/step-{checkpoint}/"},
    })  # fmt: skip
    recs = [
        Recovery(time=NOW - timedelta(minutes=10 + i), cause="Resized: ...", counted=False, to_world_size=8)
        for i in range(resizes)
    ]
    return st.model_copy(update={"recoveries": recs})


def test_a_rank_unschedulable_past_the_timeout_shrinks_the_group_to_what_is_scheduled() -> None:
    spec = parse_spec(spec_dict(nodes=2, elastic=ELASTIC))
    stranded = [rank(0), rank(1, "Pending", age=31, unschedulable=NO_ROOM)]
    resize = plan_resize(spec, status(2), train_job(2), stranded, [], None, NOW)
    assert resize is not None and resize.nodes == 1, resize
    assert resize.cause.startswith(
        "1 of 2 rank(s) unschedulable for 31s (runPolicy.elastic.replacementTimeout"
    )
    assert NO_ROOM in resize.cause
    # not before the timeout; never for a fixed-size run; never below minNodes
    early = [rank(0), rank(1, "Pending", age=29, unschedulable=NO_ROOM)]
    assert plan_resize(spec, status(2), train_job(2), early, [], None, NOW) is None
    fixed = parse_spec(spec_dict(nodes=2))
    assert plan_resize(fixed, status(2), train_job(2), stranded, [], None, NOW) is None
    floor = parse_spec(spec_dict(nodes=2, elastic={**ELASTIC, "minNodes": 2}))
    assert plan_resize(floor, status(2), train_job(2), stranded, [], None, NOW) is None
    # none scheduled at all: below minNodes, wait (Stuck) as a fixed-size run does
    nothing = [rank(i, "Pending", age=40, unschedulable=NO_ROOM) for i in range(2)]
    assert plan_resize(spec, status(2), train_job(2), nothing, [], None, NOW) is None


def test_spare_capacity_grows_the_group_at_the_next_checkpoint_within_the_hourly_budget() -> None:
    spec = parse_spec(spec_dict(nodes=2, elastic=ELASTIC))
    group = [rank(0)]
    probe = [rank(0), rank(1, "Pending", unschedulable=NO_ROOM)]  # one of two probe pods found a node
    probe = [replace_stage(p) for p in probe]
    at_40 = status(1, checkpoint=40, step=47)
    mark = capacity_mark(None, probe, at_40)
    assert mark == 40  # capacity first seen after the checkpoint of step 40
    assert plan_resize(spec, at_40, train_job(1), group, probe, mark, NOW) is None  # wait for the next one
    at_50 = status(1, checkpoint=50, step=51)
    resize = plan_resize(spec, at_50, train_job(1), group, probe, mark, NOW)
    assert resize is not None and resize.nodes == 2, resize
    assert "after the checkpoint of step 50" in resize.cause
    spent = status(1, checkpoint=50, step=51, resizes=3)  # maxResizesPerHour: 3 within the hour
    held = plan_resize(spec, spent, train_job(1), group, probe, mark, NOW)
    assert held is not None and held.held, held
    assert held.cause.endswith("3 resizes in the last hour, runPolicy.elastic.maxResizesPerHour is 3")
    obs = observe(
        spent, spec, None, None, False, {"train": train_job(1)}, group, None, None, {}, NOW, probe, mark
    )  # type: ignore[dict-item]
    assert obs.restart.delete is None and obs.grow_held == held.cause  # the group keeps running
    older = status(1, checkpoint=50, step=51, resizes=3).model_copy()
    older.recoveries[0] = older.recoveries[0].model_copy(update={"time": NOW - timedelta(minutes=61)})
    assert (
        plan_resize(spec, older, train_job(1), group, probe, mark, NOW) == resize
    )  # one fell out of the hour
    assert capacity_mark(40, [replace_stage(rank(0, "Pending", unschedulable=NO_ROOM))], at_50) is None


def replace_stage(p: PodObs) -> PodObs:
    from dataclasses import replace

    return replace(p, stage="probe", name=p.name.replace("train", "probe"))


def test_an_edited_size_re_forms_a_group_that_is_not_running() -> None:
    spec = parse_spec(spec_dict(nodes=1))  # resources.nodes edited from 2 to 1 while suspended
    resize = plan_resize(spec, status(2), train_job(2, suspended=True), [], [], None, NOW)
    assert resize is not None and resize.nodes == 1 and resize.cause.startswith("resources.nodes changed")
    # a running group keeps its size until its next (re)start
    assert plan_resize(spec, status(2), train_job(2), [rank(0), rank(1)], [], None, NOW) is None
    assert group_size(parse_spec(spec_dict(nodes=2, elastic=ELASTIC)), status(1)) == 1
    assert group_size(parse_spec(spec_dict(nodes=2)), status(1)) == 2  # fixed size: the spec's


def test_the_group_renders_at_its_size_and_the_probe_at_the_missing_nodes() -> None:
    spec = parse_spec(spec_dict(nodes=2, elastic=ELASTIC))
    assert needs_service(spec)  # may grow past one node: the Service exists from the start
    job = render_stage_job(Stage.TRAIN, REF, spec_at(spec, 1), RenderOptions())
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "--nnodes=1" in command and env["MASTER_ADDR"] == "127.0.0.1"
    assert job["spec"]["completions"] == 1 and "subdomain" not in job["spec"]["template"]["spec"]
    assert observe_job(job).nodes == 1 and observe_job(job).gpus_per_node == 8
    assert '"nodes":1' in job["spec"]["template"]["metadata"]["annotations"]["sft.tuning.dev/trainer-config"]
    two = render_stage_job(Stage.TRAIN, REF, spec_at(spec, 2), RenderOptions())
    assert "--nnodes=2" in two["spec"]["template"]["spec"]["containers"][0]["command"]

    assert probe_size(spec, False, train_job(1), [rank(0)]) == 2  # up to maxNodes 3
    assert probe_size(spec, True, train_job(1), [rank(0)]) == 0  # Kueue admits Jobs, not loose pods
    assert probe_size(spec, False, train_job(2), [rank(0)]) == 0  # not every rank runs yet
    probe = render_probe_job(job, "el", 2)
    pod = probe["spec"]["template"]["spec"]
    train_pod = job["spec"]["template"]["spec"]
    assert probe["metadata"]["name"] == "el-probe" and probe["spec"]["parallelism"] == 2
    assert probe["metadata"]["labels"]["sft.tuning.dev/stage"] == "probe"
    assert pod["containers"][0]["resources"] == train_pod["containers"][0]["resources"]
    assert pod["affinity"] == train_pod["affinity"]  # the avoided node too
    assert pod["containers"][0]["env"] == [] and "sftjob_trainer" not in pod["containers"][0]["command"]


def test_a_shrink_is_a_recovery_with_the_world_sizes_and_the_status_shows_the_size() -> None:
    spec = parse_spec(spec_dict(nodes=2, elastic=ELASTIC))
    prev = status(2, checkpoint=40, step=47)
    ranks = [rank(0), rank(1, "Pending", age=35, unschedulable=NO_ROOM)]
    obs = observe(prev, spec, None, None, False, {"train": train_job(2)}, ranks, None, None, {}, NOW)  # type: ignore[dict-item]
    assert obs.restart.delete is not None and obs.restart.delete.uid == "job-2"
    [rec] = obs.restart.status.recoveries
    assert (rec.from_world_size, rec.to_world_size, rec.counted) == (16, 8, False)
    assert (rec.resumed_from_step, rec.steps_lost) == (40, 7)
    assert rec.cause.startswith("Resized: 2 -> 1 node(s) (world size 16 -> 8): 1 of 2 rank(s) unschedulable")
    assert obs.phase.group_restart is not None and obs.phase.group_restart.startswith(
        "re-forming the training group at 1 node(s) (world size 16 -> 8) from step 40"
    )
    from sftjob_operator.render import phase as ph

    decision = ph.next_phase(obs.phase)
    assert (decision.phase, decision.reason) == ("Training", "Restarting")
    meta = {"name": "el", "namespace": "team-a", "creationTimestamp": "2026-12-07T09:00:00Z"}
    st = render_status(meta, obs, decision, NOW, 1)
    assert (st.nodes, st.world_size) == (1, 8)  # the size decided, while the old group is torn down
    gone = observe(st, spec, None, None, False, {}, [], None, None, {}, NOW)
    st2 = render_status(meta, gone, ph.next_phase(gone.phase), NOW, 1)
    assert (st2.nodes, st2.world_size) == (1, 8)  # the next group's size
