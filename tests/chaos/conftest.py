"""Fixtures of the chaos suites (docs/reliability.md): the operator fixtures of tests/operator, the counts,
and where the figures go.

Counts: small by default (each suite a few minutes in CI); `SFTJOB_CHAOS_FULL=1` runs the counts published in
docs/reliability.md; `SFTJOB_CHAOS_LIFECYCLES=N` sets any count. `SFTJOB_CHAOS_REPORT=DIR` also writes each
suite's figures to DIR/<test>.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .operator_fixtures import sftjob_crd  # noqa: F401  (the fixture, re-exported)
from .watch import Watches

FULL = os.environ.get("SFTJOB_CHAOS_FULL", "") not in ("", "0")


def count(small: int, full: int) -> int:
    chosen = os.environ.get("SFTJOB_CHAOS_LIFECYCLES")
    return int(chosen) if chosen else (full if FULL else small)


@pytest.fixture
def watches(kube: Any, namespace: str) -> Iterator[Watches]:
    with kube.api_client() as api:
        w = Watches(api, namespace).start()
        yield w
        w.stop()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], None]:
    def write(figures: dict[str, Any]) -> None:
        text = json.dumps(figures, indent=1, sort_keys=True)
        print(f"\nchaos figures ({request.node.name}):\n{text}")
        out = os.environ.get("SFTJOB_CHAOS_REPORT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"{request.node.name}.json").write_text(text + "\n")

    return write
