"""The Argo CD health docs/gitops.md promises for each SFTJob state (its table is the expectation the
tests check the Lua against), and the captured statuses' keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "gitops.md"
CAPTURES = Path(__file__).with_name("captured_statuses.json")
TABLE_MARK = "<!-- health-table -->"

# (phase, reason, Stuck condition True?) every set of real runs must go through; None: either.
REQUIRED_STATES: list[tuple[str, str, bool | None]] = [
    ("", "", False),  # created, before the operator wrote any status
    ("Pending", "PodsPending", False),
    ("Pending", "PodsPending", True),
    ("Pending", "Queued", False),
    ("Training", "PodsRunning", False),
    ("Training", "Restarting", True),  # a replacement pod that cannot be scheduled
    ("Evaluating", "EvalRunning", False),
    ("Evaluating", "Queued", False),
    ("Merging", "MergeRunning", False),
    ("Merging", "Queued", False),
    ("Suspended", "Suspended", False),
    ("Succeeded", "Succeeded", False),
    ("Failed", "TrainingFailed", False),
    ("Failed", "BackoffLimitExceeded", False),
    ("Failed", "DeadlineExceeded", False),
    ("Failed", "EvalGateFailed", False),
    ("Failed", "EvalFailed", False),
    ("Failed", "MergeFailed", False),
    ("Failed", "Stuck", None),
    ("Failed", "InvalidSpec", False),
]


def stuck(obj: dict[str, Any]) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Stuck" and c.get("status") == "True" for c in conds)


def state_key(obj: dict[str, Any]) -> tuple[str, str, str, bool]:
    st = obj.get("status") or {}
    return (obj["metadata"]["name"], st.get("phase") or "", st.get("reason") or "", stuck(obj))


def trim(obj: dict[str, Any]) -> dict[str, Any]:
    """What a capture keeps: identity, generation, status (all the health check reads)."""
    meta = obj["metadata"]
    kept = {"name": meta["name"], "namespace": meta.get("namespace"), "generation": meta.get("generation")}
    out = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": kept}
    if obj.get("status"):
        out["status"] = obj["status"]
    return out


def covered(seen: set[tuple[str, str, bool]], required: tuple[str, str, bool | None]) -> bool:
    phase, reason, want_stuck = required
    return any(s[:2] == (phase, reason) and (want_stuck is None or s[2] == want_stuck) for s in seen)


def doc_table() -> dict[tuple[str, str, str], str]:
    """{(phase, reason, stuck column): health} from the table after TABLE_MARK in docs/gitops.md.
    Columns: phase(s, comma-separated) | reason (* any) | Stuck (yes, no, any) | Argo CD health | ...;
    '(none)' is an empty status."""
    lines = DOC.read_text().split(TABLE_MARK, 1)[1].strip().splitlines()
    rows: dict[tuple[str, str, str], str] = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        phases, reason, stuck_col, health = cells[:4]
        reason = "" if reason in ("(none)", "") else reason
        for phase in phases.split(", "):
            rows[("" if phase == "(none)" else phase, reason, stuck_col)] = health.strip("*")
    assert rows, f"no health table after {TABLE_MARK} in {DOC}"
    return rows


def documented_health(phase: str, reason: str, is_stuck: bool) -> str:
    rows = doc_table()
    col = "yes" if is_stuck else "no"
    for key in ((phase, reason, col), (phase, reason, "any"), (phase, "*", col), (phase, "*", "any")):
        if key in rows:
            return rows[key]
    raise AssertionError(f"state {(phase, reason, is_stuck)} is not in the health table of {DOC}")
