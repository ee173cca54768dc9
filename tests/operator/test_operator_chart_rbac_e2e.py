"""The chart's Role is sufficient: the operator, logged in with the token of the ServiceAccount that
`helm install` created (so only that account's RBAC applies) and with the NetworkPolicy settings the chart's
Deployment gives it, creates the SFTJob's NetworkPolicy and takes the SFTJob to Succeeded. (The test bed
runs no policy controller: the policy is created, not enforced.)"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import pytest
import yaml
from conftest import apply, get, sftjob, wait_phase
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
        "--set",
        "admissionPolicy.enabled=false",  # cluster-wide: tests/e2e/test_admission_policy_apiserver.py binds its own
        "--wait=false",
    )
    try:
        token_kubeconfig = kube.sa_kubeconfig(release_ns, f"{release}-sftjob-operator")
        manifest = helm("get", "manifest", release, "--kubeconfig", str(kube.kubeconfig), "-n", release_ns)
        deploy = next(d for d in yaml.safe_load_all(manifest.stdout) if d and d["kind"] == "Deployment")
        env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        op = start_operator(
            "--kubeconfig", str(token_kubeconfig), "--network-policy", env["SFTJOB_NETWORK_POLICY"]
        )
        apply(kube, namespace, sftjob("chart-rbac", delay="1s"))
        st = wait_phase(kube, namespace, "chart-rbac", ("Succeeded", "Failed"), timeout=120, op=op)
        assert st["phase"] == "Succeeded", st
        policy = kube.get_json("networkpolicy", "-n", namespace, "chart-rbac-network")
        assert [o["uid"] for o in policy["metadata"]["ownerReferences"]] == [
            get(kube, namespace, "chart-rbac")["metadata"]["uid"]
        ]
        assert policy["spec"]["podSelector"] == {"matchLabels": {"sft.tuning.dev/job-name": "chart-rbac"}}
        scrapers = policy["spec"]["ingress"][1]["from"]  # the operator's pods, by the chart's labels
        assert scrapers[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": release_ns}
        assert json.loads(env["SFTJOB_NETWORK_POLICY"])["metricsFrom"] == scrapers
        # an API refusal reads "(403)" or "Forbidden"; a bare 403 also turns up in timestamps (",403")
        assert not re.search(r"\(403\)|Forbidden", op.log()), op.log()
    finally:
        helm(
            "uninstall", release, "--kubeconfig", str(kube.kubeconfig), "--namespace", release_ns, check=False
        )
        kube.kubectl("delete", "namespace", release_ns, "--wait=false", check=False)
