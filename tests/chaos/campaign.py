"""A campaign of SFTJob lifecycles with known outcomes, driven on the test bed while faults are injected.

Kinds (cycled in this order, so any count >= 6 has every kind):

| kind      | what happens                                                           | expected end                   |
|-----------|------------------------------------------------------------------------|--------------------------------|
| success   | train, eval, merge pods succeed                                        | Succeeded/Succeeded            |
| retry     | the first train pod is made to exit 1 (retryable); the next succeeds   | Succeeded/Succeeded, restarts 1 |
| permanent | train pods exit 2 (the trainer's permanent code: podFailurePolicy)     | Failed/TrainingFailed          |
| gate      | eval reports evalLoss 1.25 against maxEvalLoss 1.0                     | Failed/EvalGateFailed          |
| suspend   | spec.suspend set while Pending/Training, cleared once Suspended        | Succeeded/Succeeded            |
| delete    | the SFTJob is deleted while Pending/Training                           | gone, and every child gone     |

The driver keeps at most `max_inflight` SFTJobs unfinished (every pod asks for one of the test bed's 32
GPUs, so none waits for capacity), acts on what the watches report, and never asserts on time: the campaign
ends when every lifecycle has reached its end, or at a generous deadline that then counts the rest as stuck.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .operator_fixtures import sftjob
from .watch import Recorder, Seen

KINDS = ("success", "retry", "permanent", "gate", "suspend", "delete")
TERMINAL = ("Succeeded", "Failed")
EXPECTED = {
    "success": ("Succeeded", "Succeeded"),
    "retry": ("Succeeded", "Succeeded"),
    "permanent": ("Failed", "TrainingFailed"),
    "gate": ("Failed", "EvalGateFailed"),
    "suspend": ("Succeeded", "Succeeded"),
}
# Phase order for "never goes backwards" (a curated run goes Curating -> Pending while its train pods start);
# Suspended may come from and go to any non-terminal phase.
RANK = {
    None: -1,
    "Curating": 0,
    "Pending": 0,
    "Training": 1,
    "Evaluating": 2,
    "Merging": 3,
    "Succeeded": 4,
    "Failed": 4,
}


def manifest(name: str, kind: str) -> dict[str, Any]:
    if kind == "permanent":
        return sftjob(name, delay="2s", exit_code=2)
    if kind == "gate":
        message = json.dumps({"evalResults": {"evalLoss": 1.25}})
        annotations = {"kwok.sftjob.dev/delay": "2s", "kwok.sftjob.dev/message": message}
        return sftjob(
            name,
            resources={"gpusPerNode": 1, "podAnnotations": annotations},
            eval={"gates": {"maxEvalLoss": 1.0}, "metrics": ["loss"]},
        )
    # retry, suspend and delete need time in Training for the driver to act on it
    delay = {"retry": "15s", "suspend": "10s", "delete": "60s"}.get(kind, "2s")
    return sftjob(name, delay=delay)


@dataclass
class Lifecycle:
    name: str
    kind: str
    submitted: float = 0.0
    ended: float = 0.0
    acted: list[str] = field(default_factory=list)  # driver actions done: fault-injected, suspended, ...
    verdict: str = ""  # "" while running; "ok" or what was wrong

    @property
    def done(self) -> bool:
        return bool(self.ended)


def regressions(seen: Seen) -> list[str]:
    """Status going backwards in one SFTJob's watched history: observedGeneration decreasing, a phase
    lost or moving back (other than into or out of Suspended), a terminal phase left."""
    out: list[str] = []
    prev_phase: str | None = None
    prev_og = -1
    for phase, og, _gen in seen.history:
        if og is not None:
            if og < prev_og:
                out.append(f"observedGeneration {prev_og} -> {og}")
            prev_og = max(prev_og, og)
        if prev_phase is not None and phase != prev_phase:
            if phase is None:
                out.append(f"phase {prev_phase} -> (none)")
            elif prev_phase in TERMINAL:
                out.append(f"terminal phase left: {prev_phase} -> {phase}")
            elif "Suspended" not in (prev_phase, phase) and RANK[phase] < RANK[prev_phase]:
                out.append(f"phase {prev_phase} -> {phase}")
        if phase is not None:
            prev_phase = phase
    return out


class Campaign:
    def __init__(
        self,
        kube: Any,
        namespace: str,
        recorder: Recorder,
        count: int,
        max_inflight: int = 24,
        after_fault: int = 0,
    ):
        """`after_fault`: the last N lifecycles are submitted only once the fault is over, however fast the
        ones before it finish (a suite that checks what happens after the fault has lifecycles there)."""
        self.kube = kube
        self.namespace = namespace
        self.rec = recorder
        self.lifecycles = [
            Lifecycle(f"c{i:03d}-{KINDS[i % len(KINDS)]}", KINDS[i % len(KINDS)]) for i in range(count)
        ]
        self.max_inflight = max_inflight
        self.after_fault = after_fault
        self.kubectl_failures = 0  # driver calls refused while the apiserver was away (retried)
        self.fault_free_after = 0.0  # monotonic time the last fault was over

    def _kubectl(self, *args: str, input: str | None = None) -> bool:
        r = self.kube.kubectl(*args, "-n", self.namespace, input=input, check=False, timeout=30)
        if r.returncode != 0:
            self.kubectl_failures += 1
        return r.returncode == 0

    def _submit(self, lc: Lifecycle) -> None:
        if self._kubectl("apply", "-f", "-", input=json.dumps(manifest(lc.name, lc.kind))):
            lc.submitted = time.monotonic()

    def _patch_suspend(self, lc: Lifecycle, value: bool) -> bool:
        body = json.dumps({"spec": {"suspend": value}})
        return self._kubectl("patch", "sftjob", lc.name, "--type=merge", "-p", body)

    def _step(self, lc: Lifecycle) -> None:
        """Act on one running lifecycle from what the watches saw; mark it ended when it reached its end."""
        seen = self.rec.current(lc.name)
        phase = seen.phase if seen else None
        if lc.kind == "delete":
            deleting = "deleted" not in lc.acted and phase in ("Pending", "Training")
            if deleting and self._kubectl("delete", "sftjob", lc.name, "--wait=false"):
                lc.acted.append("deleted")
            if seen is not None and seen.deleted and self.rec.children_left(lc.name) == 0:
                lc.ended = time.monotonic()
            return
        if lc.kind == "retry" and "failed-pod" not in lc.acted:
            for pod in self.rec.running_pods(lc.name):
                annotations = ("kwok.sftjob.dev/exit-code=1", "kwok.sftjob.dev/delay=0s")
                if self._kubectl("annotate", "pod", pod, *annotations, "--overwrite"):
                    lc.acted.append("failed-pod")
                    break
        if lc.kind == "suspend":
            if "suspended" not in lc.acted:
                if phase in ("Pending", "Training") and self._patch_suspend(lc, True):
                    lc.acted.append("suspended")
            elif "resumed" not in lc.acted and phase == "Suspended" and self._patch_suspend(lc, False):
                lc.acted.append("resumed")
        if phase in TERMINAL:
            lc.ended = time.monotonic()

    def _held(self, fault: Any, queued: int) -> bool:
        """The last `after_fault` lifecycles wait until the fault is over."""
        return fault is not None and not fault.satisfied and queued <= self.after_fault

    def run(self, deadline_s: float, fault: Any = None) -> float:
        """Drive every lifecycle to its end (or the deadline) while `fault.tick()` injects faults, until the
        last lifecycle is submitted and `fault.satisfied`. Returns the time (monotonic) the campaign ended."""
        deadline = time.monotonic() + deadline_s
        queue = list(self.lifecycles)
        while time.monotonic() < deadline:
            if fault is not None:
                if queue or not fault.satisfied:
                    fault.tick()
                else:
                    self.fault_free_after = fault.last_end
                    fault = None
            inflight = [lc for lc in self.lifecycles if lc.submitted and not lc.done]
            while queue and len(inflight) < self.max_inflight and not self._held(fault, len(queue)):
                lc = queue[0]
                self._submit(lc)
                if not lc.submitted:
                    break  # apiserver away: try again next round
                queue.pop(0)
                inflight.append(lc)
            for lc in inflight:
                self._step(lc)
            if fault is None and not queue and all(lc.done for lc in self.lifecycles):
                break
            time.sleep(0.3)
        return time.monotonic()

    # ---- verdicts ------------------------------------------------------------------------------------------

    def judge(self) -> None:
        for lc in self.lifecycles:
            lc.verdict = self._verdict(lc)

    def _verdict(self, lc: Lifecycle) -> str:
        seen = self.rec.current(lc.name)
        if not lc.submitted:
            return "never submitted"
        if lc.kind == "delete":
            if seen is None or not seen.deleted:
                return "not deleted"
            left = self.rec.children_left(lc.name)
            return "ok" if left == 0 else f"{left} children left after deletion"
        if seen is None or seen.phase not in TERMINAL:
            return f"stuck in {seen.phase if seen else None}"
        st = seen.last.get("status") or {}
        got = (st.get("phase"), st.get("reason"))
        if got != EXPECTED[lc.kind]:
            return f"ended {got}, expected {EXPECTED[lc.kind]}: {st.get('message')}"
        if st.get("observedGeneration") != seen.last["metadata"].get("generation"):
            return f"observedGeneration {st.get('observedGeneration')} != generation {seen.last['metadata'].get('generation')}"
        if lc.kind == "retry" and st.get("restarts") != 1:
            failed = self.rec.job_status(lc.name, "train").get("failed", 0)
            if not failed and self.rec.uids(lc.name, "job", "train") == 1:
                # the annotated pod had finished already: the test missed, not the operator
                return f"not injected: one train Job, failed=0 (driver: {lc.acted})"
            return f"restarts {st.get('restarts')}, expected 1 (train Job failed={failed})"
        if lc.kind == "suspend" and "suspended" not in lc.acted:
            return "not injected: it ended before the driver saw it Pending or Training"
        if lc.kind == "suspend" and "Suspended" not in [h[0] for h in seen.history]:
            return f"never Suspended (driver: {lc.acted})"
        return "ok"

    def _allowed_children(self, name: str, resource: str, stage: str) -> int:
        """1 of each child; a group restart replaces the train Job (one more per restart in the status)."""
        seen = self.rec.current(name)
        restarts = int((seen.last.get("status") or {}).get("restarts") or 0) if seen else 0
        return 1 + restarts if (resource, stage) == ("job", "train") else 1

    def figures(self, settled_s: float) -> dict[str, Any]:
        """The numbers docs/reliability.md publishes (and the test asserts on, but for settle time)."""
        self.judge()
        with self.rec.lock:
            seens = [s for s in self.rec.sftjobs.values() if s.name.startswith("c")]
        back = {s.name: r for s in seens if (r := regressions(s))}
        missed = {lc.name: lc.verdict for lc in self.lifecycles if lc.verdict.startswith("not injected")}
        wrong = {
            lc.name: lc.verdict
            for lc in self.lifecycles
            if lc.verdict != "ok" and not lc.verdict.startswith(("stuck", "never submitted", "not injected"))
        }
        stuck = {
            lc.name: lc.verdict
            for lc in self.lifecycles
            if lc.verdict.startswith(("stuck", "never submitted"))
        }
        durations = sorted(lc.ended - lc.submitted for lc in self.lifecycles if lc.done)
        return {
            "lifecycles": len(self.lifecycles),
            "kinds": {k: sum(1 for lc in self.lifecycles if lc.kind == k) for k in KINDS},
            "duplicate_children": self.rec.duplicates(self._allowed_children),
            "stuck": stuck,
            "wrong_outcome": wrong,
            "correct": sum(1 for lc in self.lifecycles if lc.verdict == "ok"),
            # a retry whose pod finished before the driver failed it, a suspend that ended before the driver
            # saw it running: the test missed its chance, the operator did nothing wrong
            "fault_not_injected": missed,
            "regressions": back,
            "status_events_watched": sum(len(s.history) for s in seens),
            "settle_s": round(settled_s, 1),
            "lifecycle_s_median": round(durations[len(durations) // 2], 1) if durations else None,
            "lifecycle_s_max": round(durations[-1], 1) if durations else None,
            "driver_calls_refused": self.kubectl_failures,
        }
