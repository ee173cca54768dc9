"""render/ownership.py: whose an existing object with a child's name is (adopt, wait, or conflict)."""

from __future__ import annotations

from sftjob_operator.render.names import owner_reference
from sftjob_operator.render.ownership import Existing, classify, conflict_message


def obj(*owners: dict[str, object], deleting: bool = False) -> dict[str, object]:
    meta: dict[str, object] = {"name": "run-train", "ownerReferences": list(owners)}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    return {"metadata": meta}


def test_adopted_only_with_this_sftjobs_uid() -> None:
    assert classify(obj(owner_reference("run", "u1")), "run", "u1") == Existing.MINE
    # an earlier SFTJob of the same name: its children are on their way out (garbage collector)
    assert classify(obj(owner_reference("run", "u0")), "run", "u1") == Existing.LEFTOVER
    assert classify(obj(deleting=True), "run", "u1") == Existing.LEFTOVER
    # no owner, another SFTJob, or something else owning it: never ours
    assert classify(obj(), "run", "u1") == Existing.FOREIGN
    assert classify(obj(owner_reference("other", "u2")), "run", "u1") == Existing.FOREIGN
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "run", "uid": "u1x"}
    assert classify(obj(deploy), "run", "u1") == Existing.FOREIGN


def test_conflict_message_names_the_object_and_its_owner() -> None:
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u9"}
    msg = conflict_message("train Job", "ns", "run-train", obj(deploy))
    assert msg.startswith(
        "train Job ns/run-train already exists and is not this SFTJob's (owner: Deployment/web)"
    )
    assert "(owner: none)" in conflict_message("Service", "ns", "run-train", obj())
