"""The chart's admin policy (a ValidatingAdmissionPolicy generated from sftjob_api/policy.py) on the real
kube-apiserver: each rule refuses an SFTJob breaking it with a message naming the field, and the default
policy lets every shipped example through (moved below the namespace's prefix: policy_cases.py).

Each policy is bound to its own namespace only (the chart binds it cluster-wide): other tests share this
apiserver. Requests are server-side dry runs: validating admission runs in full, nothing is stored."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from policy_cases import STRICT, VIOLATIONS, allowed, in_namespace_prefix, shipped_sftjobs, violating
from testbed.helm import CHART, helm
from testbed.procs import wait_until

from sftjob_api.crd import CRD_FILE, REPO_ROOT

pytestmark = pytest.mark.e2e


def dry_run(kube: Any, namespace: str, doc: dict[str, Any]) -> Any:
    text = json.dumps({**doc, "metadata": {**doc["metadata"], "namespace": namespace}})
    return kube.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=text, check=False)


def install_policy(kube: Any, namespace: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's policy and binding, the binding limited to `namespace`; returns once it refuses."""
    release = f"p{secrets.token_hex(3)}"
    args = [f"--set-json=admissionPolicy.{k}={json.dumps(v)}" for k, v in values.items()]
    out = helm(
        "template", release, str(CHART), "--kube-version", "1.34.0",
        "--show-only", "templates/admission-policy.yaml", *args,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d]
    binding = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding")
    selector = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    binding["spec"]["matchResources"] = {"namespaceSelector": selector}
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    # The apiserver's policy informer picks new policies up a moment later: probe until a known-bad SFTJob
    # (an image outside the list) is refused.
    probe = violating(namespace, next(c for c in VIOLATIONS if c[0] == "spec.resources.image"), 99)
    wait_until(
        lambda: "spec.resources.image" in dry_run(kube, namespace, probe).stderr, 30, "policy in force"
    )
    return docs


@pytest.fixture(scope="module")
def bound(kube: Any) -> Iterator[dict[str, str]]:
    """Namespaces under the default policy, under the STRICT one, and under none."""
    kube.apply_crd(REPO_ROOT / "crds" / CRD_FILE)
    spaces = {name: kube.create_namespace(f"policy-{name}") for name in ("default", "strict", "none")}
    installed = install_policy(kube, spaces["default"], {}) + install_policy(kube, spaces["strict"], STRICT)
    yield spaces
    for d in installed:
        kube.kubectl("delete", d["kind"], d["metadata"]["name"], "--wait=false", check=False)
    for ns in spaces.values():
        kube.delete_namespace(ns)


def test_each_rule_refuses_naming_its_field(kube, bound):
    for i, case in enumerate(VIOLATIONS):
        ns = bound[case[2]]
        result = dry_run(kube, ns, violating(ns, case, i))
        assert result.returncode != 0, f"{case[0]} was admitted"
        assert "ValidatingAdmissionPolicy" in result.stderr and case[0] in result.stderr, result.stderr


def test_without_the_policy_the_same_sftjobs_are_admitted(kube, bound):
    ns = bound["none"]
    for i, case in enumerate(VIOLATIONS):
        result = dry_run(kube, ns, violating(ns, case, i))
        assert result.returncode == 0, f"{case[0]}: {result.stderr}"


def test_the_allowed_sftjob_passes_both_policies(kube, bound):
    for name in ("default", "strict"):
        result = dry_run(kube, bound[name], allowed(bound[name]))
        assert result.returncode == 0, result.stderr


def test_the_default_policy_lets_every_shipped_example_through(kube, bound):
    ns = bound["default"]
    for name, doc in shipped_sftjobs():
        result = dry_run(kube, ns, in_namespace_prefix(doc, ns))
        assert result.returncode == 0, f"{name}: {result.stderr}"
