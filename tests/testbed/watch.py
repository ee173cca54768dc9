"""A real list+watch loop on the test bed that survives the apiserver going away: nothing a controller
writes is missed (a poll can miss a state that lasts less than its interval)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]


class Watcher(threading.Thread):
    """One list+watch loop in a daemon thread; `on_event(type, obj)` gets plain dicts (camelCase keys)."""

    def __init__(
        self,
        name: str,
        api: client.ApiClient,
        list_fn: Callable[..., Any],
        on_event: Callable[[str, Obj], None],
        **kw: Any,
    ):
        super().__init__(name=f"watch-{name}", daemon=True)
        self.api = api
        self.list_fn = list_fn
        self.kw = kw
        self.on_event = on_event
        self.stopping = threading.Event()
        self.errors = 0  # watch connections that ended in an error (apiserver gone, ...)
        self.relists = 0  # full lists (the first one, then one per 410 Gone)
        self.known: dict[str, Obj] = {}  # uid -> last object seen, for deletions a relist reveals

    def stop(self) -> None:
        self.stopping.set()

    def _plain(self, obj: Any) -> Obj:
        return obj if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)

    def _deliver(self, kind: str, obj: Obj) -> None:
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self.known.pop(uid, None)
        else:
            self.known[uid] = obj
        self.on_event(kind, obj)

    def _relist(self) -> str:
        """List, and deliver as DELETED what was known and is gone: an object deleted while the watch was
        away (a 410 after the apiserver restarted) has no DELETED event of its own (client-go's informers
        do the same: DeletedFinalStateUnknown)."""
        listing = self._plain(self.list_fn(_request_timeout=(5, 30), **self.kw))
        items = listing.get("items") or []
        listed = {item["metadata"]["uid"] for item in items}
        for uid in [u for u in self.known if u not in listed]:
            self._deliver("DELETED", self.known[uid])
        for item in items:
            self._deliver("LISTED", item)
        self.relists += 1
        return listing["metadata"]["resourceVersion"]

    def run(self) -> None:
        rv: str | None = None
        while not self.stopping.is_set():
            try:
                if rv is None:
                    rv = self._relist()
                stream = watch.Watch().stream(
                    self.list_fn,
                    resource_version=rv,
                    timeout_seconds=20,
                    allow_watch_bookmarks=True,
                    _request_timeout=(5, 25),  # a watch the apiserver keeps silent (starting) is redialled
                    **self.kw,
                )
                for event in stream:
                    obj = event["raw_object"]
                    rv = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._deliver(event["type"], obj)
                    if self.stopping.is_set():
                        break
            except ApiException as e:
                self.errors += 1
                if e.status == 410:
                    rv = None  # too old: list again (the checks compare against the last state seen)
                time.sleep(0.5)
            except Exception:  # connection refused/reset while the apiserver is down: resume from rv
                self.errors += 1
                time.sleep(0.5)
