"""The chart on the real control plane: helm install, the operator Deployment exists, and its
ServiceAccount may do exactly what the operator needs (kubectl auth can-i, answered by the real RBAC
authorizer)."""

from __future__ import annotations

import secrets

import pytest
from chart import CHART, helm

pytestmark = pytest.mark.e2e


@pytest.fixture
def release(kube, namespace):
    """Installs the chart in namespace-list mode, watching two fresh namespaces."""
    watched = [kube.create_namespace("watched-a"), kube.create_namespace("watched-b")]
    name = f"sft-{secrets.token_hex(3)}"
    helm(
        "install",
        name,
        str(CHART),
        "--kubeconfig",
        str(kube.kubeconfig),
        "--namespace",
        namespace,
        "--set",
        "watch.namespaces={" + ",".join(watched) + "}",
        "--wait=false",
        # A cluster-wide admin policy would refuse other tests' SFTJobs on this apiserver; it has its own
        # test (tests/e2e/test_admission_policy_apiserver.py), bound to that test's namespace.
        "--set",
        "admissionPolicy.enabled=false",
    )
    yield name, namespace, watched
    helm("uninstall", name, "--kubeconfig", str(kube.kubeconfig), "--namespace", namespace, check=False)
    for ns in watched:
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def can_i(kube, sa: str, *args: str) -> bool:
    result = kube.kubectl("auth", "can-i", f"--as={sa}", *args, check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stdout + result.stderr
    return result.stdout.strip() == "yes"


def test_install_creates_the_operator_and_least_privilege_rbac(kube, release):
    name, ns, (watched, also_watched) = release
    deploy = kube.get_json("deployment", f"{name}-sftjob-operator", "-n", ns)
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SFTJOB_NAMESPACES"] == f"{watched},{also_watched}"
    kube.kubectl("get", "crd", "sftjobs.sft.tuning.dev")

    sa = f"system:serviceaccount:{ns}:{name}-sftjob-operator"
    needed = [
        ("create", "jobs.batch"),
        ("patch", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("watch", "jobs.batch"),
        ("patch", "sftjobs.sft.tuning.dev"),
        ("patch", "sftjobs.sft.tuning.dev", "--subresource=status"),
        ("list", "pods"),
        ("delete", "pods"),  # a torn-down group's pods on a NotReady node (docs/recovery.md)
        ("create", "services"),
        ("create", "events"),
        ("patch", "kopfpeerings.kopf.dev"),
    ]
    for verb, resource, *extra in needed:
        for target in (watched, also_watched):
            assert can_i(kube, sa, verb, resource, "-n", target, *extra), (
                f"{sa} cannot {verb} {resource} in {target}"
            )
    assert can_i(kube, sa, "list", "customresourcedefinitions.apiextensions.k8s.io")
    assert can_i(kube, sa, "get", "nodes")  # is the node under a training rank Ready

    forbidden = [
        ("get", "secrets", "-n", watched),
        ("list", "secrets", "--all-namespaces"),
        ("create", "pods", "-n", watched),
        ("create", "configmaps", "-n", watched),  # the trainer config travels in the pod template
        ("create", "jobs.batch", "-n", ns),  # the release namespace is not watched
        ("list", "sftjobs.sft.tuning.dev", "--all-namespaces"),
        ("escalate", "roles.rbac.authorization.k8s.io", "-n", watched),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    for args in forbidden:
        assert not can_i(kube, sa, *args), f"{sa} may {' '.join(args)}"

    trainer = f"system:serviceaccount:{watched}:sftjob-trainer"
    assert not can_i(kube, trainer, "get", "pods", "-n", watched)
    assert not can_i(kube, trainer, "get", "secrets", "-n", watched)
