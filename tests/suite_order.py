"""Order and account the suite by test module, for parallel runs (pytest-xdist, `--dist loadfile`).

Each xdist worker runs whole modules, so module-scoped fixtures (a chart install, Kueue, an MLflow server)
start once. Modules are handed out longest first (tests/module_durations.json, recorded from a full run):
the real node's module, the longest, starts at once instead of last, and the short ones fill the gaps at
the end. A module missing from the file counts as NEW_MODULE_S. The same record picks the inner loop's
modules (`-m quick`, scripts/test.sh --quick): those at or under QUICK_MODULE_S.

    bash scripts/test.sh --record-durations     # a full run rewrites tests/module_durations.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

DURATIONS_FILE = Path(__file__).resolve().with_name("module_durations.json")
NEW_MODULE_S = 60.0  # a module not yet recorded: assume a mid-sized e2e module
QUICK_MODULE_S = 60.0  # `scripts/test.sh --quick` runs the modules recorded at or under this (CRD e2e: ~50 s)


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def load_durations(path: Path = DURATIONS_FILE) -> dict[str, float]:
    return json.loads(path.read_text()) if path.exists() else {}


def is_quick(module: str, durations: dict[str, float]) -> bool:
    """In the inner loop: recorded, and at or under the bound (a new module joins once a run records it)."""
    return module in durations and durations[module] <= QUICK_MODULE_S


def longest_first(nodeids: Sequence[str], durations: dict[str, float]) -> list[int]:
    """Indices of `nodeids` reordered so that modules come by recorded duration, longest first; tests keep
    their order inside a module and equal modules keep collection order (a stable sort)."""
    first_seen: dict[str, int] = {}
    for nodeid in nodeids:
        first_seen.setdefault(module_of(nodeid), len(first_seen))

    def key(i: int) -> tuple[float, int]:
        module = module_of(nodeids[i])
        return (-durations.get(module, NEW_MODULE_S), first_seen[module])

    return sorted(range(len(nodeids)), key=key)


def module_totals(reports: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(nodeid, seconds) of every setup/call/teardown -> seconds per module, rounded, longest first."""
    totals: dict[str, float] = defaultdict(float)
    for nodeid, seconds in reports:
        totals[module_of(nodeid)] += seconds
    return {m: round(s, 1) for m, s in sorted(totals.items(), key=lambda kv: -kv[1])}


def write_durations(totals: dict[str, float], path: Path = DURATIONS_FILE) -> None:
    """Merge `totals` into the file (a partial run updates the modules it ran), longest first."""
    merged = {**load_durations(path), **totals}
    path.write_text(json.dumps(dict(sorted(merged.items(), key=lambda kv: -kv[1])), indent=1) + "\n")
