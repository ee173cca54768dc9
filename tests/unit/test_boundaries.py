"""The package boundaries: sftjob_operator and sftjob_trainer never import each other; both depend only on
sftjob_api, which imports neither of them nor the heavy stacks (torch, kopf, ...). Inside the operator, the
functional core (sftjob_operator/render/) does no Kubernetes I/O: it imports neither kubernetes nor kopf,
nor the handlers that do."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "sftjob_api": ROOT / "operator" / "sftjob_api",
    "sftjob_operator": ROOT / "operator" / "sftjob_operator",
    "sftjob_trainer": ROOT / "trainer_image" / "sftjob_trainer",
}
FORBIDDEN = {
    "sftjob_operator": {"sftjob_trainer"},
    "sftjob_trainer": {"sftjob_operator", "kopf", "kubernetes"},
    "sftjob_api": {
        "sftjob_operator",
        "sftjob_trainer",
        "kopf",
        "kubernetes",
        "torch",
        "transformers",
        "peft",
        "deepspeed",
        "bitsandbytes",
    },
}
IMPORT_FUNCTIONS = {"import_module", "__import__"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported by one file: import statements (anywhere, also inside functions) and
    importlib.import_module / __import__ calls with a literal name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in IMPORT_FUNCTIONS and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return found


def violations(package: str) -> list[str]:
    out = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        for module in imported_modules(path):
            if module.split(".")[0] in FORBIDDEN[package]:
                out.append(f"{path.relative_to(ROOT)} imports {module}")
    return out


# The operator's pure core: render/ decides, handlers/ talks to the API server.
RENDER = PACKAGES["sftjob_operator"] / "render"
RENDER_FORBIDDEN = {"kubernetes", "kopf", "sftjob_operator.handlers", "sftjob_operator.main"}


def render_violations(root: Path = RENDER) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        relative = {  # `from ..handlers import x` inside render/ is sftjob_operator.handlers
            f"sftjob_operator.{node.module}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module
        }
        for module in imported_modules(path) | relative:
            if any(module == f or module.startswith(f + ".") for f in RENDER_FORBIDDEN):
                out.append(f"{path.relative_to(root)} imports {module}")
    return out


def test_render_is_pure_no_kubernetes_or_kopf():
    assert RENDER.is_dir() and len(list(RENDER.glob("*.py"))) > 5
    assert render_violations() == []


def test_the_render_check_sees_a_client_import(tmp_path):
    (tmp_path / "m.py").write_text(
        "from kubernetes.client import CoreV1Api\nfrom ..handlers.kube import Kube\nimport kopf\n"
    )
    assert len(render_violations(tmp_path)) == 3


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_inside_its_boundary(package):
    assert violations(package) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "def f():\n    from sftjob_trainer import model_cache\n    importlib.import_module('torch')\n"
    )
    assert imported_modules(f) == {"sftjob_trainer", "torch"}


def test_sftjob_api_loads_without_the_heavy_stacks():
    modules = sorted(p.stem for p in PACKAGES["sftjob_api"].glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('sftjob_api.' + m)\n"
        "print(sorted(m for m in ('torch', 'kopf', 'kubernetes', 'sftjob_operator', 'sftjob_trainer')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
