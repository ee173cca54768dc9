"""constraints.txt: the versions the project is tested with (written by .ci/freeze_constraints.py), used by
the README's install commands and scripts/test.sh. Checked: every requirement is pinned and satisfied by its
pin, the test environment runs those pins, and a clean virtualenv installs with them without resolver
backtracking, every installed package pinned."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"
INSTALL_SH = REPO / "trainer_image" / "install.sh"
BACKTRACKING = "is looking at multiple versions"


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def project_requirements(extras: tuple[str, ...] | None = None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra != "bench" and (extras is None or extra in extras):
            reqs += items
    return [Requirement(r) for r in reqs]


def install_sh_requirements() -> list[Requirement]:
    text = INSTALL_SH.read_text()
    stack = re.search(r"STACK=\((.*?)\)", text, re.S)
    assert stack, "trainer_image/install.sh has no STACK=( ... )"
    specs = re.findall(r'"([^"$]+)"', stack[1])
    specs += re.findall(r'(?:TORCH_SPEC:-|DS_SPEC=")([^}"]+)', text)
    assert len(specs) >= 10, specs
    return [Requirement(s) for s in specs]


def test_every_requirement_is_pinned_and_its_pin_satisfies_it() -> None:
    pinned = pins()
    problems = []
    for req in project_requirements() + install_sh_requirements():
        version = pinned.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} -> {version}")
    assert not problems, f"constraints.txt does not satisfy: {problems} (rerun .ci/freeze_constraints.py)"


def test_this_environment_runs_the_pinned_versions() -> None:
    """scripts/test.sh installs [dev] with -c constraints.txt: the suite tests exactly these versions."""
    pinned = pins()
    wrong = {}
    for req in project_requirements(("dev",)):
        name = canonicalize_name(req.name)
        installed = metadata.version(req.name)
        if installed != pinned[name]:
            wrong[name] = (installed, pinned[name])
    assert not wrong, f"installed vs constraints.txt: {wrong}"


def _venv_pip(venv: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def _installed(venv: Path) -> dict[str, str]:
    listing = _venv_pip(venv, "list", "--format=json", "--exclude-editable").stdout
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(listing)}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_clean_virtualenv_installs_with_the_constraints_without_backtracking(tmp_path: Path) -> None:
    """The README's `PIP_CONSTRAINT=constraints.txt pip install -e .` from PyPI into a new virtualenv with no
    pip cache (what a bare machine does), then a dry run of the [dev,local,model] extras with `-c`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bundled = _installed(venv)  # pip (and setuptools) that come with the virtualenv itself
    t0 = time.monotonic()
    r = _venv_pip(venv, "install", "--no-cache-dir", "-e", ".", env={"PIP_CONSTRAINT": str(CONSTRAINTS)})
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert BACKTRACKING not in r.stdout + r.stderr, r.stdout
    print(f"PIP_CONSTRAINT=constraints.txt pip install -e . into a clean virtualenv: {took:.0f} s")

    pinned = pins()
    added = {n: v for n, v in _installed(venv).items() if bundled.get(n) != v}
    assert "kopf" in added and "boto3" in added, added
    unpinned = {n: v for n, v in added.items() if pinned.get(n) != v}
    assert not unpinned, f"installed but not pinned at that version: {unpinned}"

    report = tmp_path / "report.json"
    extras = ".[dev,local,model]"
    r = _venv_pip(
        venv,
        "install",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
        "-c",
        str(CONSTRAINTS),
        "-e",
        extras,
    )
    assert r.returncode == 0 and BACKTRACKING not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    resolved = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    resolved.pop("sftjob", None)
    unpinned = {n: v for n, v in resolved.items() if pinned.get(n) != v}
    assert not unpinned, f"{extras} resolves packages constraints.txt does not pin: {unpinned}"
