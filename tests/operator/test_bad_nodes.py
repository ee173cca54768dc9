"""Avoiding the bad node, decided purely (render/bad_nodes.py, render/recovery.py): which failures point at a
node, the recovery that names it, and the anti-affinity later train Jobs carry."""

from __future__ import annotations

from datetime import UTC, datetime

from sftjob_api.run_policy import RunPolicy
from sftjob_api.status import Recovery, SFTJobStatus
from sftjob_operator.render.bad_nodes import (
    MAX_AVOIDED_NODES,
    avoided_nodes,
    node_problem,
    with_avoided_nodes,
)
from sftjob_operator.render.observe import JobObs, PodObs
from sftjob_operator.render.recovery import classify_failure, plan_restart

NOW = datetime(2026, 12, 1, tzinfo=UTC)
HOST = "kubernetes.io/hostname"


def pod(i: int, node: str, phase: str = "Running", **kw: object) -> PodObs:
    return PodObs(name=f"g-train-{i}", stage="train", phase=phase, created=NOW, index=i, node=node, **kw)  # type: ignore[arg-type]


def test_node_problem_needs_not_ready_and_the_eviction_taint() -> None:
    unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}
    no_schedule = {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    unknown = {
        "status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}
    }
    assert node_problem(ready) is None
    # Ready again, the taint not yet lifted
    assert node_problem({**ready, "spec": {"taints": [unreachable]}}) is None
    assert node_problem({**unknown, "spec": {"taints": [unreachable]}}) == "NotReady (NodeStatusUnknown)"
    not_ready = {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}
    assert node_problem({"spec": {"taints": [not_ready]}, "status": {}}) == "NotReady (no Ready condition)"
    # NotReady without the controller's NoExecute taint: every node at once after an apiserver outage (the
    # controller's full-disruption mode), or not yet judged; no group restart for that
    assert node_problem(unknown) is None
    assert node_problem({**unknown, "spec": {"taints": [no_schedule]}}) is None
    assert node_problem(None) == "gone"


def test_a_live_rank_on_a_not_ready_node_restarts_the_group_uncounted_and_names_the_node() -> None:
    train = JobObs(name="g-train", uid="u1", active=2)
    pods = [pod(0, "n0"), pod(1, "n1")]
    plan = plan_restart(SFTJobStatus(phase="Training"), RunPolicy(), train, pods, None, NOW, {"n1": "gone"})
    [rec] = plan.status.recoveries
    assert rec.node == "n1" and not rec.counted and plan.status.restarts == 0
    assert rec.cause == "node n1 gone under pod g-train-1 (rank 1)"
    assert plan.delete == train
    assert [p.name for p in plan.force_delete] == ["g-train-1"]  # no kubelet on n1 will end it
    healthy = plan_restart(SFTJobStatus(phase="Training"), RunPolicy(), train, pods, None, NOW, {})
    assert healthy.delete is None and not healthy.status.recoveries


def test_failures_that_blame_the_node_are_not_counted() -> None:
    evicted = pod(1, "n1", "Failed", reason="Evicted", exit_code=137)
    f = classify_failure([pod(0, "n0", "Failed", exit_code=1), evicted])
    assert (f.node, f.counted) == ("n1", False)  # rank 0's exit 1 is the consequence
    assert f.cause == "pod g-train-1 (rank 1) Evicted, exit code 137 on node n1"
    assert classify_failure([pod(0, "n0", "Failed", exit_code=1)]).counted
    tainted = pod(1, "n1", "Failed", exit_code=143, disruption="DeletionByTaintManager: Taint manager: ...")
    f = classify_failure([pod(0, "n0", "Failed", exit_code=1), tainted])
    assert (f.node, f.counted) == ("n1", False) and "disrupted on node n1" in f.cause
    preempted = pod(1, "n1", "Failed", disruption="PreemptionByScheduler: ...")
    assert classify_failure([preempted]).node is None  # preemption says nothing about the node
    f = classify_failure([pod(1, "n1", "Failed", exit_code=1)], {"n1": "NotReady (NodeStatusUnknown)"})
    assert (f.node, f.counted) == ("n1", False) and "on node n1 (NotReady (NodeStatusUnknown))" in f.cause


def test_avoided_nodes_are_the_recoveries_nodes_newest_last_bounded() -> None:
    recs = [Recovery(time=NOW, cause="x", node=n) for n in ["a", None, "b", "a"]]
    assert avoided_nodes(recs) == ("b", "a")
    many = [Recovery(time=NOW, cause="x", node=f"n{i}") for i in range(MAX_AVOIDED_NODES + 3)]
    assert avoided_nodes(many)[0] == "n3" and len(avoided_nodes(many)) == MAX_AVOIDED_NODES


def test_anti_affinity_is_anded_into_every_user_term() -> None:
    assert with_avoided_nodes(None, ()) is None
    expr = {"key": HOST, "operator": "NotIn", "values": ["n1"]}
    assert with_avoided_nodes(None, ("n1",)) == {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [expr]}
        ]}}
    }  # fmt: skip
    zone = {"key": "zone", "operator": "In", "values": ["a"]}
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [zone]}, {"matchFields": [{"key": "x"}]}]
            }
        },
        "podAffinity": {"k": 1},
    }
    out = with_avoided_nodes(user, ("n1",))
    assert out is not None
    terms = out["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [zone, expr]},
        {"matchFields": [{"key": "x"}], "matchExpressions": [expr]},
    ]
    assert out["podAffinity"] == {"k": 1}
    assert user["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0] == {
        "matchExpressions": [zone]
    }  # the spec's own affinity is not modified
