"""Fault injectors for the chaos suites: SIGKILL an operator on a beat, take the apiserver away for a while.

Both work on the test bed's public objects only (`Operator` from tests/operator/conftest.py, `Cluster.procs`
and `Proc` from tests/testbed), so the test bed itself needs no change.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from testbed.procs import Proc, wait_until


class KillLoop:
    """Every ~`every_s` (+-20 %, seeded), SIGKILL the operator `pick()` names and start it again at once, as
    a Deployment would; counts kills, and operators found dead before their kill (a crash).

    Driven by `tick()` from the campaign's loop in the main thread: a child started from a helper thread
    would get SIGTERM when that thread ends (the test bed's Procs die with their parent, PR_SET_PDEATHSIG).
    """

    def __init__(self, pick: Callable[[], Any], every_s: float, seed: int, min_kills: int = 3):
        self.pick = pick
        self.every_s = every_s
        self.rng = random.Random(seed)
        self.min_kills = min_kills
        self.kills = 0
        self.found_dead: list[str] = []
        self.failed_starts: list[str] = []
        self.last_end = time.monotonic()  # when the last fault was over (operator healthy again)
        self._next = self.last_end + self._gap()

    def _gap(self) -> float:
        return self.rng.uniform(0.8 * self.every_s, 1.2 * self.every_s)

    @property
    def satisfied(self) -> bool:
        return self.kills >= self.min_kills

    def tick(self) -> None:
        if time.monotonic() < self._next:
            return
        op = self.pick()
        if op.proc is not None and not op.proc.alive():
            self.found_dead.append(f"{op.proc.name}: exit {op.proc.popen.returncode}")
        op.kill9()
        self.kills += 1
        try:
            op.start(timeout=120)
        except Exception as e:  # reported as a figure: a restart that never became healthy
            self.failed_starts.append(f"{type(e).__name__}: {str(e)[:300]}")
        self.last_end = time.monotonic()
        self._next = self.last_end + self._gap()

    def figures(self) -> dict[str, Any]:
        return {
            "kills": self.kills,
            "operator_died_on_its_own": self.found_dead,
            "restarts_not_healthy": self.failed_starts,
        }


def peering_priority(op: Any) -> int | None:
    """The priority an operator replica runs with, from its start-up log line (it may draw its own)."""
    found = (
        re.findall(r"peering priority (-?\d+)", op.proc.log_path.read_text(errors="replace"))
        if op.proc
        else []
    )
    return int(found[-1]) if found else None


def active_replica(replicas: list[Any]) -> Any:
    """The replica kopf peering lets act: the live one with the highest priority."""
    live = [op for op in replicas if op.proc is not None and op.proc.alive()]
    return max(live, key=lambda op: peering_priority(op) or 0)


class ApiserverOutage:
    """One apiserver outage of `down_s`, `after_s` into the campaign (driven by `tick()` like KillLoop)."""

    def __init__(self, kube: Any, after_s: float, down_s: float):
        self.kube = kube
        self.down_s = down_s
        self.at = time.monotonic() + after_s
        self.done: dict[str, float] = {}
        self.last_end = 0.0
        self.ended_at: datetime | None = None

    @property
    def satisfied(self) -> bool:
        return bool(self.done)

    def tick(self) -> None:
        if not self.done and time.monotonic() >= self.at:
            self.done = apiserver_outage(self.kube, self.down_s)
            self.last_end = time.monotonic()
            self.ended_at = datetime.now()  # local wall clock, as in the operator's log lines


def apiserver_outage(kube: Any, down_s: float) -> dict[str, float]:
    """SIGKILL kube-apiserver, keep it away `down_s`, start it again with the same argv (same port, certs and
    etcd data), and wait until it is ready. Returns how long it was unreachable and how long start-up took."""
    index, old = next((i, p) for i, p in enumerate(kube.procs) if p.name == "kube-apiserver")
    t0 = time.monotonic()
    os.kill(old.pid, signal.SIGKILL)
    old.popen.wait(30)
    old.stop()  # closes its log; the new process appends to the same file
    time.sleep(down_s)
    t1 = time.monotonic()
    new = Proc("kube-apiserver", old.argv, kube.logs_dir)
    kube.procs[index] = new

    def ready() -> bool:
        new.check_alive()
        return kube.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0

    wait_until(ready, 180, "kube-apiserver ready again after the outage", interval=0.5)
    t2 = time.monotonic()
    return {"unreachable_s": round(t2 - t0, 1), "start_s": round(t2 - t1, 1)}
