"""tests/operator/conftest.py (the operator as a killable subprocess, manifest helpers), loaded once under its
own module name (testbed.operator_e2e) so the chaos suites reuse it without copying."""

from __future__ import annotations

from testbed.operator_e2e import load

operator_e2e = load()
Operator = operator_e2e.Operator
create_peering = operator_e2e.create_peering
sftjob = operator_e2e.sftjob
sftjob_crd = operator_e2e.sftjob_crd
