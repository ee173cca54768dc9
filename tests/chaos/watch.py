"""Real watches on the test bed, recorded for the chaos checks.

A `Watcher` (testbed/watch.py) lists, then watches from the list's resourceVersion, resumes from the last one it saw after any
error (the apiserver going away included), and lists again when the apiserver answers 410 Gone. Every object
it sees goes to a `Recorder`, which keeps what the checks need:

- per SFTJob (by uid): every (phase, observedGeneration, generation) it was seen with, in order;
- per child (Service, stage Job) of each SFTJob: every uid it ever had (more than one = a duplicate);
- per SFTJob: the train pods seen Running (the campaign injects retryable failures into them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kubernetes import client
from testbed.watch import Obj, Watcher

from sftjob_api import GROUP, PLURAL, VERSION
from sftjob_operator.render.names import LABEL_JOB_NAME, LABEL_STAGE


@dataclass
class Seen:
    """One SFTJob as the watch delivered it over time."""

    name: str
    uid: str
    history: list[tuple[str | None, int | None, int | None]] = field(default_factory=list)
    deleted: bool = False
    last: Obj = field(default_factory=dict)

    @property
    def phase(self) -> str | None:
        return self.history[-1][0] if self.history else None


class Recorder:
    """Thread-safe record of what the watches saw in one namespace."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sftjobs: dict[str, Seen] = {}  # by uid
        self.by_name: dict[str, str] = {}  # name -> newest uid
        self.children: dict[tuple[str, str, str], set[str]] = {}  # (sftjob, kind, stage) -> uids
        self.live_children: dict[str, set[str]] = {}  # sftjob -> uids of children not deleted
        self.last_child: dict[tuple[str, str, str], Obj] = {}  # (sftjob, kind, stage) -> newest object
        self.running_train_pods: dict[str, set[str]] = {}  # sftjob -> names of Running train pods
        self.status_changes: list[float] = []  # monotonic times of watched SFTJob status changes (MODIFIED)

    def sftjob(self, kind: str, obj: Obj) -> None:
        meta, st = obj["metadata"], obj.get("status") or {}
        with self.lock:
            seen = self.sftjobs.setdefault(meta["uid"], Seen(meta["name"], meta["uid"]))
            self.by_name[meta["name"]] = meta["uid"]
            entry = (st.get("phase"), st.get("observedGeneration"), meta.get("generation"))
            if not seen.history or seen.history[-1] != entry:
                seen.history.append(entry)
                if kind == "MODIFIED":
                    self.status_changes.append(time.monotonic())
            seen.last = obj
            if kind == "DELETED":
                seen.deleted = True

    def child(self, resource: str, kind: str, obj: Obj) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        owner = labels.get(LABEL_JOB_NAME)
        if not owner:
            return
        key = (owner, resource, labels.get(LABEL_STAGE, ""))
        with self.lock:
            self.children.setdefault(key, set()).add(meta["uid"])
            self.last_child[key] = obj
            live = self.live_children.setdefault(owner, set())
            if kind == "DELETED":
                live.discard(meta["uid"])
            else:
                live.add(meta["uid"])

    def pod(self, kind: str, obj: Obj) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        owner = labels.get(LABEL_JOB_NAME)
        if not owner or labels.get(LABEL_STAGE) != "train":
            return
        running = kind != "DELETED" and (obj.get("status") or {}).get("phase") == "Running"
        with self.lock:
            pods = self.running_train_pods.setdefault(owner, set())
            (pods.add if running else pods.discard)(meta["name"])

    # ---- reads for the campaign ---------------------------------------------------------------------------

    def current(self, name: str) -> Seen | None:
        with self.lock:
            uid = self.by_name.get(name)
            return self.sftjobs.get(uid) if uid else None

    def running_pods(self, name: str) -> list[str]:
        with self.lock:
            return sorted(self.running_train_pods.get(name, ()))

    def job_status(self, name: str, stage: str) -> Obj:
        with self.lock:
            return dict(self.last_child.get((name, "job", stage), {}).get("status") or {})

    def children_left(self, name: str) -> int:
        with self.lock:
            return len(self.live_children.get(name, ()))

    def uids(self, name: str, resource: str, stage: str) -> int:
        with self.lock:
            return len(self.children.get((name, resource, stage), ()))

    def duplicates(self, allowed: Callable[[str, str, str], int]) -> dict[str, int]:
        """Children created more often than `allowed(sftjob, kind, stage)` (1, but for the train Job one
        more per group restart the status records: docs/recovery.md), by key."""
        with self.lock:
            counts = {k: len(v) for k, v in self.children.items()}
        return {"/".join(k): n - allowed(*k) for k, n in counts.items() if n > allowed(*k)}


class Watches:
    """The watches a chaos run needs in one namespace: SFTJobs, their Jobs, Services, pods."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.recorder = Recorder()
        custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
        r, sel = self.recorder, {"label_selector": LABEL_JOB_NAME}

        def sftjobs(**kw: Any) -> Any:
            return custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **kw)

        self.watchers = [
            Watcher("sftjobs", api, sftjobs, r.sftjob),
            Watcher(
                "jobs", api, batch.list_namespaced_job, partial(r.child, "job"), namespace=namespace, **sel
            ),
            Watcher(
                "services",
                api,
                core.list_namespaced_service,
                partial(r.child, "service"),
                namespace=namespace,
                **sel,
            ),
            Watcher("pods", api, core.list_namespaced_pod, r.pod, namespace=namespace, **sel),
        ]

    def start(self) -> Watches:
        for w in self.watchers:
            w.start()
        return self

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()
        for w in self.watchers:
            w.join(45)

    @property
    def errors(self) -> int:
        return sum(w.errors for w in self.watchers)

    @property
    def relists(self) -> int:
        return sum(w.relists for w in self.watchers)
