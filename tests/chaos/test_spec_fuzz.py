"""Spec fuzzing (issue 14, part 5): generated SFTJob manifests (tests/chaos/spec_fuzz.py) created on the real
apiserver with the operator running. Each must be refused at admission with a message naming the field, or
accepted and then either valid (a phase other than Failed, and the operator's own parser agrees) or
Failed/InvalidSpec naming the field. The operator never dies or logs a traceback; every child object's name
is valid; no child runs a shell; the marker file that an injected command would create never appears.

Valid bases are created suspended (`spec.suspend: true`; a mutation may flip it), so the operator renders
and creates every child (where core/v1 judges the free-form fields) without running hundreds of pods.
Figures: docs/reliability.md (`SFTJOB_CHAOS_FULL=1`: 500 manifests; default 80).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sftjob_api import GROUP, PLURAL, VERSION, SpecError, parse_spec

from .conftest import FULL, count
from .operator_fixtures import Operator, sftjob
from .spec_fuzz import child_name_problems, manifests, names_field

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(3600 if FULL else 900)]

BATCH = 40  # accepted SFTJobs judged, then deleted, together
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "dash", "/bin/dash"}


class Fuzz:
    def __init__(self, api: client.ApiClient, namespace: str, marker: Path):
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.ns = namespace
        self.marker = marker
        self.outcomes: Counter[str] = Counter()
        self.violations: list[str] = []
        self.pending: dict[str, list[Any]] = {}  # accepted, not judged yet: name -> mutations
        self.children_checked = 0
        self.n = 0

    def create(self, obj: dict[str, Any], muts: list[Any]) -> None:
        name = f"{obj['metadata']['name']}-{self.n}"
        obj["metadata"]["name"] = name
        self.n += 1
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, obj)
        except ApiException as e:
            if e.status not in (400, 422) or not names_field(str(e.body)):
                self.violations.append(f"refused without naming a field: {name}: {e.status} {e.body!r:.600}")
            self.outcomes["refused_at_admission"] += 1
            return
        self.pending[name] = muts
        if len(self.pending) >= BATCH:
            self.settle()

    def _items(self) -> dict[str, dict[str, Any]]:
        out = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)
        return {o["metadata"]["name"]: o for o in out["items"]}

    def settle(self, timeout: float = 180) -> None:
        """Wait until every pending SFTJob has a phase (Failed for invalid ones), judge, check, delete."""
        deadline = time.monotonic() + timeout
        while True:
            items = self._items()
            waiting = [n for n in self.pending if not (items.get(n, {}).get("status") or {}).get("phase")]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(1)
        for name, muts in self.pending.items():
            self.judge(name, items.get(name), muts)
        self.check_children()
        self.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)
        wait_end = time.monotonic() + 120
        while self._items() and time.monotonic() < wait_end:
            time.sleep(1)
        self.pending.clear()

    def judge(self, name: str, obj: dict[str, Any] | None, muts: list[Any]) -> None:
        st = (obj or {}).get("status") or {}
        phase, reason, message = st.get("phase"), st.get("reason"), str(st.get("message") or "")
        try:
            parse_spec((obj or {}).get("spec") or {})
            python_ok = True
        except SpecError:
            python_ok = False
        if not phase:
            self.outcomes["no_phase"] += 1
            self.violations.append(f"no phase: {name} {muts!r:.300}")
        elif phase == "Failed" and reason == "InvalidSpec":
            kind = "child_refused" if "refused the" in message else "operator"
            self.outcomes[f"accepted_then_invalid_spec_{kind}"] += 1
            if not names_field(message):
                self.violations.append(f"InvalidSpec without a field: {name}: {message[:300]}")
        elif phase == "Failed":
            self.outcomes["accepted_then_failed_otherwise"] += 1
            self.violations.append(f"Failed/{reason} (not InvalidSpec): {name}: {message[:300]}")
        else:
            self.outcomes["accepted_valid"] += 1
            if not python_ok:
                self.violations.append(f"{phase} although the operator's parser refuses the spec: {name}")

    def check_children(self) -> None:
        sel = "sft.tuning.dev/job-name"
        found = [("Job", j) for j in self.batch.list_namespaced_job(self.ns, label_selector=sel).items]
        found += [
            ("Service", s) for s in self.core.list_namespaced_service(self.ns, label_selector=sel).items
        ]
        for kind, obj in found:
            self.children_checked += 1
            self.violations += [
                f"invalid child name: {p}" for p in child_name_problems(kind, obj.metadata.name)
            ]
            if kind == "Job":
                for c in obj.spec.template.spec.containers:
                    argv = [*(c.command or []), *(c.args or [])]
                    if argv and argv[0] in SHELLS:
                        self.violations.append(f"Job {obj.metadata.name} runs a shell: {argv!r:.200}")
                    if any(str(self.marker) in a for a in argv):
                        self.violations.append(f"Job {obj.metadata.name} carries an injected command")


def test_generated_manifests(sftjob_crd: Any, namespace: str, tmp_path: Path, report: Any) -> None:
    n = count(80, 500)
    marker = tmp_path / "injected-marker"
    base = sftjob("fz", suspend=True)
    op = Operator(sftjob_crd, namespace).start()
    t0 = time.monotonic()
    try:
        with sftjob_crd.api_client() as api:
            fuzz = Fuzz(api, namespace, marker)

            @settings(
                max_examples=n,
                database=None,
                phases=[Phase.generate],  # every manifest is applied once; no shrinking against the cluster
                deadline=None,
                derandomize=not FULL,
                suppress_health_check=list(HealthCheck),
            )
            @given(manifests(base, str(marker)))
            def apply_one(case: tuple[dict[str, Any], list[Any]]) -> None:
                fuzz.create(*case)

            apply_one()
            fuzz.settle()
        alive = op.proc is not None and op.proc.alive()
        log = op.proc.log_path.read_text(errors="replace") if op.proc else ""
    finally:
        op.stop()
    figures = {
        "manifests": fuzz.n,
        "outcomes": dict(fuzz.outcomes),
        "children_checked": fuzz.children_checked,
        "operator_alive": alive,
        "operator_tracebacks": log.count("Traceback"),
        "marker_created": marker.exists(),
        "violations": fuzz.violations,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    report(figures)
    assert fuzz.n >= n
    assert fuzz.violations == [], figures
    assert alive and figures["operator_tracebacks"] == 0, log[-5000:]
    assert not marker.exists()
