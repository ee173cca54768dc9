"""Helpers for the Helm chart tests: rendering and PromQL parsing."""

from __future__ import annotations

import re
from typing import Any

import yaml
from testbed.helm import CHART, helm

RULES = CHART / "rules" / "sftjob-alerts.yaml"
KUBE_VERSION = "1.34.0"


def set_args(values: dict[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def render(values: dict[str, str] | None = None, namespace: str = "sftjob-system") -> list[dict[str, Any]]:
    result = helm(
        "template",
        "sft",
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
        "--include-crds",
        *set_args(values or {}),
    )
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana template variables so promtool can parse the expression."""
    return re.sub(
        r"\$\{?(namespace|sftjob|__rate_interval)\}?", lambda m: "5m" if "rate" in m[1] else ".*", expr
    )
