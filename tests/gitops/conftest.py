"""The operator e2e fixtures (tests/operator/conftest.py), reused here without copying them: that file is
loaded under its own module name and its fixtures re-exported."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "operator" / "conftest.py"
_spec = importlib.util.spec_from_file_location("sftjob_operator_e2e_fixtures", _PATH)
assert _spec is not None and _spec.loader is not None
operator_e2e = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = operator_e2e
_spec.loader.exec_module(operator_e2e)

sftjob_crd = operator_e2e.sftjob_crd
operator = operator_e2e.operator
