"""tests/operator/conftest.py (the operator as a killable subprocess, SFTJob manifest and status helpers),
loaded once under its own module name so other test directories reuse it without copying it: importing it
as `conftest` would collide with their own conftest modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "sftjob_operator_e2e_fixtures"
_PATH = Path(__file__).resolve().parents[1] / "operator" / "conftest.py"


def load() -> ModuleType:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return module
