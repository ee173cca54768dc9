"""Helpers for the Helm chart tests: the helm binary from the test bed cache, rendering, PromQL parsing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from testbed.kube import CACHE, PROVISION_HINT

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sftjob-operator"
RULES = CHART / "rules" / "sftjob-alerts.yaml"
KUBE_VERSION = "1.34.0"


def helm_bin() -> str:
    env_file = CACHE / "versions.env"
    if not env_file.exists():
        raise RuntimeError(f"helm not built: {PROVISION_HINT}")
    dirs = dict(line.split("=", 1) for line in env_file.read_text().split() if "=" in line)
    path = Path(dirs["HELM_BIN"]) / "helm"
    if not path.exists():
        raise RuntimeError(f"{path} missing: {PROVISION_HINT}")
    return str(path)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_bin(), *args], capture_output=True, text=True, check=check, timeout=120)


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
