"""The helm binary built by tests/testbed/build.sh, and a runner for it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .kube import PROVISION_HINT, binary_dirs

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sftjob-operator"


def helm_bin() -> str:
    path = Path(binary_dirs().get("HELM_BIN", "/nonexistent")) / "helm"
    if not path.exists():
        raise RuntimeError(f"{path} missing: {PROVISION_HINT}")
    return str(path)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=180)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"helm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result
