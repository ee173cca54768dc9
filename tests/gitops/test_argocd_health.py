"""The Argo CD health check (helm/sftjob-operator/argocd/health.lua) in a real Lua 5.1 set up like Argo
CD's VM: on the statuses captured from real operator runs (tests/gitops/captured_statuses.json, written by
test_argocd_health_e2e.py), on the states a run passes through too briefly to capture, and as the chart
ships it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from lupa.lua51 import LuaError  # each lupa runtime has its own exception classes
from testbed.helm import CHART, helm

from gitops.argocd_lua import ARGOCD_CM_KEY, HEALTH_LUA, health
from gitops.health_table import CAPTURES, REQUIRED_STATES, covered, doc_table, documented_health, state_key

CAPTURED: list[dict[str, Any]] = json.loads(CAPTURES.read_text())


def captured(phase: str, reason: str | None = None) -> dict[str, Any]:
    obj = next(o for o in CAPTURED if state_key(o)[1] == phase and reason in (None, state_key(o)[2]))
    return copy.deepcopy(obj)


def test_the_captures_cover_every_phase_and_failure_reason() -> None:
    seen = {state_key(o)[1:] for o in CAPTURED}
    assert all(covered(seen, r) for r in REQUIRED_STATES), [
        r for r in REQUIRED_STATES if not covered(seen, r)
    ]


@pytest.mark.parametrize("obj", CAPTURED, ids=lambda o: "/".join(str(x) for x in state_key(o)))
def test_each_captured_status_gets_the_documented_health(obj: dict[str, Any]) -> None:
    _, phase, reason, is_stuck = state_key(obj)
    got = health(obj)
    assert got["status"] == documented_health(phase, reason, is_stuck), (got, obj.get("status"))
    st = obj.get("status") or {}
    if got["status"] == "Degraded" and phase == "Failed":
        assert st["reason"] in got["message"] and st["message"] in got["message"]  # the why, in Argo CD's UI
    if is_stuck and phase != "Failed":
        cond = next(c for c in st["conditions"] if c["type"] == "Stuck")
        assert cond["reason"] in got["message"] and cond["message"] in got["message"]


def test_every_documented_state_is_a_valid_argocd_health() -> None:
    assert {h for h in doc_table().values()} <= {"Healthy", "Progressing", "Degraded", "Suspended"}


def test_a_spec_change_not_yet_observed_is_progressing_but_a_finished_run_stays_finished() -> None:
    paused = captured("Suspended")
    paused["metadata"]["generation"] = paused["status"]["observedGeneration"] + 1  # Git set suspend: false
    got = health(paused)
    assert got["status"] == "Progressing" and "observe generation" in got["message"], got
    for phase in ("Succeeded", "Failed"):
        done = captured(phase)
        done["metadata"]["generation"] = done["status"]["observedGeneration"] + 1
        assert health(done)["status"] == health(captured(phase))["status"]


def test_progress_and_stuck_during_training() -> None:
    running = captured("Training", "PodsRunning")
    running["status"]["progress"] = {"summary": "1200/4000 (30%)", "step": 1200, "totalSteps": 4000}
    got = health(running)
    assert got["status"] == "Progressing" and got["message"].endswith("; step 1200/4000 (30%)"), got
    stuck = next(o for o in CAPTURED if state_key(o)[3] and state_key(o)[1] != "Failed")
    running["status"]["conditions"] = [c for c in stuck["status"]["conditions"] if c["type"] == "Stuck"]
    assert health(running)["status"] == "Degraded"
    running["status"]["conditions"][0]["status"] = "False"  # the pods started: back to Progressing
    assert health(running)["status"] == "Progressing"


def test_an_unknown_phase_is_unknown_not_a_guess() -> None:
    obj = captured("Training")
    obj["status"]["phase"] = "Distilling"
    assert health(obj) == {"status": "Unknown", "message": "Unknown SFTJob phase Distilling"}


def test_the_sandbox_is_argocds_a_script_using_the_string_library_fails() -> None:
    with pytest.raises(LuaError):
        health(captured("Training"), "hs = {}\nhs.status = string.upper('healthy')\nreturn hs")


def render_health_configmap(*sets: str) -> list[dict[str, Any]]:
    args = [
        "template",
        "sftjob",
        str(CHART),
        "-n",
        "sftjob-system",
        "--show-only",
        "templates/argocd-health.yaml",
        "--kube-version",
        "1.34.0",
    ]
    for s in sets:
        args += ["--set", s]
    r = helm(*args, check=False)
    if "could not find template" in r.stderr:  # rendered nothing (the default: opt-in)
        return []
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_the_chart_ships_the_check_under_the_argocd_cm_key() -> None:
    assert render_health_configmap() == []  # opt-in
    (cm,) = render_health_configmap("argocd.healthCheck.enabled=true", "argocd.healthCheck.namespace=argocd")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "argocd"
    assert cm["metadata"]["name"] == "sftjob-argocd-health"  # the name docs/gitops.md's command uses
    assert cm["data"] == {ARGOCD_CM_KEY: HEALTH_LUA.read_text().rstrip("\n")}
    assert health(captured("Succeeded"), cm["data"][ARGOCD_CM_KEY])["status"] == "Healthy"
    lint = helm("lint", "--strict", str(CHART), "--set", "argocd.healthCheck.enabled=true", check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    typo = helm(
        "template",
        "x",
        str(CHART),
        "--kube-version",
        "1.34.0",
        "--set",
        "argocd.healthCheck.enable=true",
        check=False,
    )
    assert typo.returncode != 0 and "enable" in typo.stderr  # values.schema.json knows the new keys


@pytest.mark.parametrize(
    ("phase", "reason", "message"),
    [
        ("Curating", "CurateRunning", "curating the training data"),
        ("Curating", "Queued", "waiting for Kueue to admit the curation Job"),
        ("Failed", "CurationFailed", "curation Job failed (PodFailurePolicy): maxDropFraction: 0.42 > 0.2"),
        ("Aligning", "PodsRunning", "2/2 trainer pod(s) running"),
        ("Aligning", "Restarting", "restarting every rank from step 10 after pod dpo-align-1-x (rank 1)"),
        (
            "Failed",
            "AlignmentFailed",
            "trainer exited with a permanent error: prefs.jsonl:3: chosen equals rejected",
        ),
    ],
)
def test_curation_and_alignment_states_get_the_documented_health(
    phase: str, reason: str, message: str
) -> None:
    """The curate and align stages came after the captures: their states, written onto a captured Evaluating
    status."""
    obj = captured("Evaluating", "EvalRunning")
    obj["status"].update(phase=phase, reason=reason, message=message)
    got = health(obj)
    assert got["status"] == documented_health(phase, reason, False), got
    assert reason in got["message"] and message in got["message"], got
    stuck = next(o for o in CAPTURED if state_key(o)[3] and state_key(o)[1] != "Failed")
    obj["status"]["conditions"] = [c for c in stuck["status"]["conditions"] if c["type"] == "Stuck"]
    assert health(obj)["status"] == documented_health(phase, reason, True) == "Degraded"
