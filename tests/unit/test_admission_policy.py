"""The operator's side of the admin policy (sftjob_api/policy.py), with the policy the chart passes it:
each rule refuses naming its field, every shipped example passes, and the chart's generated
ValidatingAdmissionPolicy is up to date with the rules (tests/e2e/test_admission_policy_apiserver.py runs it)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from policy_cases import STRICT, VIOLATIONS, allowed, in_namespace_prefix, shipped_sftjobs, violating
from testbed.helm import CHART, helm

from sftjob_api import parse_sftjob, policy
from sftjob_operator.settings import from_args

NS = "team-a"


def chart_policy(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the chart's Deployment passes the operator in SFTJOB_ADMISSION_POLICY, read back by its settings."""
    args = [f"--set-json=admissionPolicy.{k}={json.dumps(v)}" for k, v in (values or {}).items()]
    out = helm(
        "template",
        "sft",
        str(CHART),
        "--show-only",
        "templates/deployment.yaml",
        "--kube-version",
        "1.34.0",
        *args,
    ).stdout
    env = {
        e["name"]: e.get("value")
        for e in yaml.safe_load(out)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    settings = from_args([], {"SFTJOB_ADMISSION_POLICY": env["SFTJOB_ADMISSION_POLICY"]})
    assert settings.admission_policy is not None
    return dict(settings.admission_policy)


@pytest.fixture(scope="module")
def policies() -> dict[str, dict[str, Any]]:
    return {"default": chart_policy(), "strict": chart_policy(STRICT)}


def test_the_chart_template_is_generated_from_the_rules():
    assert policy.main(["--check"]) == 0, "run: python -m sftjob_api.policy --write"


def test_the_default_policy_is_the_namespace_prefix_and_the_chart_trainer_image(policies):
    default = policies["default"]
    assert default["uriPrefixes"] == ["s3://sftjob/{namespace}/*", "pvc://*"]
    assert default["images"] == ["ghcr.io/sftjob/trainer:0.1.0"]
    assert default["serviceAccounts"] == ["sftjob-trainer"]


@pytest.mark.parametrize("case", VIOLATIONS, ids=[c[0] for c in VIOLATIONS])
def test_each_rule_refuses_naming_its_field(policies, case):
    doc = violating(NS, case, 0)
    parse_sftjob(doc)  # the CRD's own rules accept it: only the policy refuses
    found = policy.violations(doc, NS, policies[case[2]])
    assert found and all(m.startswith(case[0]) for m in found), found
    assert policy.policy_error(doc, NS, policies[case[2]]).startswith(
        f"refused by the admin policy: {case[0]}"
    )
    if case[2] == "strict":
        assert policy.violations(doc, NS, policies["default"]) == []


@pytest.mark.parametrize("name", ["default", "strict"])
def test_the_allowed_sftjob_passes(policies, name):
    assert policy.violations(allowed(NS), NS, policies[name]) == []


def test_one_namespace_cannot_name_another_namespace_prefix(policies):
    assert policy.violations(allowed("team-b"), NS, policies["default"])  # team-b's URIs, created in team-a
    assert policy.violations(allowed(NS), "team-ab", policies["default"])  # a prefix of a name is not its own


@pytest.mark.parametrize("name,doc", shipped_sftjobs(), ids=[n for n, _ in shipped_sftjobs()])
def test_every_shipped_example_passes_the_default_policy(policies, name, doc):
    assert policy.violations(in_namespace_prefix(doc, NS), NS, policies["default"]) == []


def test_no_policy_no_check_and_a_malformed_policy_stops_the_operator():
    assert policy.policy_error(violating(NS, VIOLATIONS[0], 0), NS, None) is None
    assert from_args([], {}).admission_policy is None
    for bad in ('["x"]', '{"images": "x"}', '{"imagez": []}', '{"modelCacheNames": "yes"}'):
        with pytest.raises(SystemExit, match="--admission-policy"):
            from_args([], {"SFTJOB_ADMISSION_POLICY": bad})
