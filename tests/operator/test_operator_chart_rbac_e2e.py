"""The chart's Role is sufficient: the operator, logged in with the token of the ServiceAccount that
`helm install` created (so only that account's RBAC applies), takes an SFTJob to Succeeded."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest
from conftest import apply, sftjob, wait_phase
from testbed.helm import CHART, helm

pytestmark = pytest.mark.e2e


def test_operator_under_the_chart_service_account_completes_an_sftjob(
    sftjob_crd: Any, namespace: str, start_operator: Any
) -> None:
    kube = sftjob_crd
    release_ns = kube.create_namespace("sftjob-system")
    release = f"sft-{secrets.token_hex(3)}"
    helm(
        "install",
        release,
        str(CHART),
        "--kubeconfig",
        str(kube.kubeconfig),
        "--namespace",
        release_ns,
        "--set",
        f"watch.namespaces={{{namespace}}}",
        "--wait=false",
    )
    try:
        token_kubeconfig = kube.sa_kubeconfig(release_ns, f"{release}-sftjob-operator")
        op = start_operator("--kubeconfig", str(token_kubeconfig))
        apply(kube, namespace, sftjob("chart-rbac", delay="1s"))
        st = wait_phase(kube, namespace, "chart-rbac", ("Succeeded", "Failed"), timeout=120, op=op)
        assert st["phase"] == "Succeeded", st
        # an API refusal reads "(403)" or "Forbidden"; a bare 403 also turns up in timestamps (",403")
        assert not re.search(r"\(403\)|Forbidden", op.log()), op.log()
    finally:
        helm(
            "uninstall", release, "--kubeconfig", str(kube.kubeconfig), "--namespace", release_ns, check=False
        )
        kube.kubectl("delete", "namespace", release_ns, "--wait=false", check=False)
