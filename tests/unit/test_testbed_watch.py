"""The test bed's list+watch loop (tests/testbed/watch.py): a relist after the watch was away (410 Gone once
the apiserver restarted) delivers as DELETED every object it knew that is gone, as client-go's informers do.
Without it, an SFTJob deleted while the watch was away stayed "not deleted" in the chaos checks."""

from __future__ import annotations

from typing import Any

from testbed.watch import Watcher


def obj(uid: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "name": f"n-{uid}", "resourceVersion": rv}}


def test_a_relist_delivers_the_objects_gone_meanwhile_as_deleted() -> None:
    listings = [[obj("a", "1"), obj("b", "2")], [obj("b", "5"), obj("c", "6")]]
    events: list[tuple[str, str]] = []

    def list_fn(**_: Any) -> dict[str, Any]:
        items = listings.pop(0)
        return {"items": items, "metadata": {"resourceVersion": items[-1]["metadata"]["resourceVersion"]}}

    w = Watcher(
        "t", api=None, list_fn=list_fn, on_event=lambda k, o: events.append((k, o["metadata"]["uid"]))
    )
    assert w._relist() == "2"
    assert w._relist() == "6"
    assert events == [("LISTED", "a"), ("LISTED", "b"), ("DELETED", "a"), ("LISTED", "b"), ("LISTED", "c")]
    assert sorted(w.known) == ["b", "c"] and w.relists == 2
