"""The operator e2e fixtures (tests/operator/conftest.py), reused here without copying them: that file is
loaded under its own module name and its fixtures re-exported."""

from __future__ import annotations

from testbed.operator_e2e import load

operator_e2e = load()

sftjob_crd = operator_e2e.sftjob_crd
operator = operator_e2e.operator
