"""Whose is an object that already has a child's name? (issue 25: only our own children)

A create answered 409 used to count as "already mine"; an object of the same name made by someone else
would then stand in for the child, and the TTL clean-up deleted it by name. Now an existing object is
adopted only when its ownerReference carries this SFTJob's uid; one left by an earlier SFTJob of the same
name (the garbage collector has not removed it yet) is waited for; anything else is a conflict that fails
the run naming the object, and is never patched or deleted.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sftjob_api import API_VERSION, KIND

Obj = dict[str, Any]


class Existing(StrEnum):
    MINE = "mine"  # owned by this SFTJob (uid): adopt
    LEFTOVER = "leftover"  # an earlier SFTJob of this name, or being deleted: wait, create again later
    FOREIGN = "foreign"  # someone else's: conflict


def owners(obj: Obj) -> list[Obj]:
    return [dict(o) for o in (obj.get("metadata") or {}).get("ownerReferences") or []]


def classify(existing: Obj, sftjob_name: str, sftjob_uid: str) -> Existing:
    refs = owners(existing)
    if any(o.get("uid") == sftjob_uid for o in refs):
        return Existing.MINE
    earlier = any(
        o.get("apiVersion") == API_VERSION and o.get("kind") == KIND and o.get("name") == sftjob_name
        for o in refs
    )
    if earlier or (existing.get("metadata") or {}).get("deletionTimestamp"):
        return Existing.LEFTOVER
    return Existing.FOREIGN


def conflict_message(kind: str, namespace: str, name: str, existing: Obj) -> str:
    """`Job ns/x-train already exists and is not this SFTJob's (owner: Deployment/web): ...`."""
    refs = owners(existing)
    owner = ", ".join(f"{o.get('kind')}/{o.get('name')}" for o in refs) or "none"
    return (
        f"{kind} {namespace}/{name} already exists and is not this SFTJob's (owner: {owner}); the operator "
        "leaves it alone: delete or rename it, or give the SFTJob another name"
    )
