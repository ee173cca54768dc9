"""tests/operator/conftest.py (the operator as a killable subprocess, manifest helpers), loaded once under its
own module name so the chaos suites reuse it without copying (tests/gitops does the same)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "sftjob_operator_e2e_fixtures"
_PATH = Path(__file__).resolve().parents[1] / "operator" / "conftest.py"


def _load() -> ModuleType:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return module


operator_e2e = _load()
Operator = operator_e2e.Operator
sftjob = operator_e2e.sftjob
sftjob_crd = operator_e2e.sftjob_crd
