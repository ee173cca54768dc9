"""The Helm chart, rendered offline: lint, schema-valid manifests, least-privilege RBAC, dashboards and
alert rules checked by the real helm and promtool binaries."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart import CHART, RULES, grafana_to_promql, helm, render, set_args

from sftjob_operator import dashboards
from sftjob_operator.handlers import kube
from sftjob_operator.render.network_policy import NetworkPolicyOptions, render_network_policy
from sftjob_operator.render.objects import METRICS_PORT, SFTJobRef

FULL = {
    "watch.namespaces": "{team-a,team-b}",
    "networkPolicy.enabled": "true",
    "serviceMonitor.enabled": "true",
    "podMonitor.enabled": "true",
    "prometheusRule.enabled": "true",
    "replicaCount": "2",
}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # Prometheus Operator CRDs
OWN_KINDS = {"KopfPeering", "ClusterKopfPeering"}  # our chart's own CRDs


@pytest.mark.parametrize("values", [{}, FULL], ids=["defaults", "everything-on"])
def test_lint_is_clean(values):
    result = helm("lint", "--strict", str(CHART), *set_args(values), "--kube-version", "1.34.0")
    assert "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("values", [{}, FULL], ids=["defaults", "everything-on"])
def test_rendered_manifests_match_the_kubernetes_schemas(values):
    docs = render(values)
    checked = 0
    for doc in docs:
        if doc["kind"] in MONITORING_KINDS | OWN_KINDS:
            continue
        kubernetes_validate.validate(doc, "1.34", strict=True)
        checked += 1
    assert checked >= 8


def test_schema_rejects_bad_values():
    bad = helm("template", "sft", str(CHART), "--set", "replicaCount=many", check=False)
    assert bad.returncode != 0 and "replicaCount" in bad.stderr
    typo = helm("template", "sft", str(CHART), "--set", "watch.namespace=x", check=False)
    assert typo.returncode != 0 and "namespace" in typo.stderr


def test_chart_crd_is_the_generated_one():
    docs = {d["metadata"]["name"]: d for d in render() if d["kind"] == "CustomResourceDefinition"}
    generated = yaml.safe_load((CHART.parents[1] / "crds" / "sft.tuning.dev_sftjobs.yaml").read_text())
    assert docs["sftjobs.sft.tuning.dev"] == generated


def _rules(docs, kind):
    return [r for d in docs if d["kind"] == kind for r in d["rules"]]


def test_rbac_is_least_privilege():
    for values in ({}, FULL):
        docs = render(values)
        rules = _rules(docs, "ClusterRole") + _rules(docs, "Role")
        assert rules
        for rule in rules:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "secrets" not in rule["resources"], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_namespace_list_mode_grants_no_cluster_wide_access_to_workloads():
    docs = render(FULL)
    cluster_rules = _rules(docs, "ClusterRole")
    cluster_resources = {res for r in cluster_rules for res in r["resources"]}
    # nodes: read-only `get` (is the node under a training rank Ready, docs/recovery.md); nothing else
    assert cluster_resources == {"customresourcedefinitions", "namespaces", "nodes"}
    assert [r["verbs"] for r in cluster_rules if "nodes" in r["resources"]] == [["get"]]
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    trainer_sas = [
        d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "sftjob-trainer"
    ]
    assert len(trainer_sas) == 2 and all(sa["automountServiceAccountToken"] is False for sa in trainer_sas)


def test_dashboards_are_generated_and_shipped_as_configmaps():
    assert dashboards.main(["--check"]) == 0, "run python -m sftjob_operator.dashboards --write"
    maps = [d for d in render() if d["kind"] == "ConfigMap"]
    assert len(maps) == 2 and all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)
    titles = {json.loads(next(iter(m["data"].values())))["title"] for m in maps}
    assert titles == {"SFTJob training", "SFTJob operator"}


def test_every_promql_expression_parses(tmp_path):
    exprs = [grafana_to_promql(p.expr) for p in dashboards.all_panels()]
    rules = yaml.safe_load(RULES.read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    as_rules = {
        "groups": [
            {"name": "parse", "rules": [{"record": f"check:{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "parse.yaml"
    path.write_text(yaml.safe_dump(as_rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests():
    tests = CHART.parent / "tests" / "sftjob-alerts.test.yaml"
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    cases = yaml.safe_load(tests.read_text())["tests"]
    firing = {a["alertname"] for c in cases for a in c["alert_rule_test"] if a["exp_alerts"]}
    assert len(alerts) == 7 and firing == alerts, "every alert needs a test case where it fires"


def test_prometheus_rule_wraps_the_rules_file():
    rule = next(d for d in render(FULL) if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_every_panel_is_documented():
    doc = (CHART.parents[1] / "docs" / "observability.md").read_text()
    missing = [p.title for p in dashboards.all_panels() if f"| {p.title} |" not in doc]
    assert not missing, f"docs/observability.md lacks panels {missing}"


def test_peering_object_only_with_several_replicas():
    assert not [d for d in render() if "KopfPeering" in d["kind"]]
    peerings = [d for d in render(FULL) if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert all(p["metadata"]["name"] == "sftjob-operator" for p in peerings)
    cluster = [d for d in render({"replicaCount": "2"}) if d["kind"] == "ClusterKopfPeering"]
    assert len(cluster) == 1
    deploy = next(d for d in render(FULL) if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SFTJOB_PEERING"] == "sftjob-operator"


def _network_policy(values: dict[str, str]) -> dict[str, Any] | None:
    """The NetworkPolicy the operator renders for an SFTJob under this chart's settings (None: off)."""
    deploy = next(d for d in render(values) if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    if "SFTJOB_NETWORK_POLICY" not in env:
        return None
    opts = NetworkPolicyOptions.from_json(env["SFTJOB_NETWORK_POLICY"])
    return render_network_policy(SFTJobRef("run", "team-a", "u"), opts, METRICS_PORT)


def _egress_ports(values: dict[str, str]) -> list[list[int]]:
    policy = _network_policy(values)
    assert policy is not None
    return [[p["port"] for p in rule.get("ports", [])] for rule in policy["spec"]["egress"]]


def test_network_policy_egress_ports_configurable():
    # defaults: HTTPS/HTTP and self-hosted S3-compatible stores (MinIO 9000, SeaweedFS 8333), DNS
    assert [443, 80, 9000, 8333] in _egress_ports(FULL)
    assert [53, 53] in _egress_ports(FULL)
    assert [443, 7480] in _egress_ports({**FULL, "networkPolicy.s3Ports": "{443,7480}"})


def test_network_policy_is_on_by_default_and_per_sftjob():
    """The default install is the isolated one: the operator gets the settings and the RBAC to create one
    NetworkPolicy per SFTJob (the chart renders none: one policy cannot say "the same job-name value")."""
    for values in ({}, {"watch.namespaces": "{team-a}"}):
        docs = render(values)
        assert not [d for d in docs if d["kind"] == "NetworkPolicy"]
        policy = _network_policy(values)
        assert policy is not None
        kubernetes_validate.validate(policy, "1.34", strict=True)
        operator_pods = policy["spec"]["ingress"][1]["from"][0]
        assert operator_pods["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "sftjob-system"
        }
        assert operator_pods["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "sft"
        grants = [
            r
            for r in _rules(docs, "ClusterRole") + _rules(docs, "Role")
            if "networkpolicies" in r["resources"]
        ]
        assert [(r["apiGroups"], sorted(r["verbs"])) for r in grants] == [
            (["networking.k8s.io"], ["create", "get"])
        ]
    off = {"networkPolicy.enabled": "false"}
    assert _network_policy(off) is None
    assert not [r for r in _rules(render(off), "ClusterRole") if "networkpolicies" in r["resources"]]


def test_network_policy_values_reach_the_policy():
    values = {
        "networkPolicy.s3Cidrs": "{10.0.0.0/8}",
        "networkPolicy.apiServerCidrs": "{10.0.0.10/32}",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team": "monitoring",
    }
    policy = _network_policy(values)
    assert policy is not None
    kubernetes_validate.validate(policy, "1.34", strict=True)
    [block] = [
        peer["ipBlock"] for rule in policy["spec"]["egress"] for peer in rule["to"] if "ipBlock" in peer
    ]
    assert block == {"cidr": "10.0.0.0/8", "except": ["10.0.0.10/32"]}  # link-local lies outside 10/8
    scrapers = policy["spec"]["ingress"][1]["from"]
    assert scrapers[1] == {"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}


def test_operator_verb_list_names_the_network_policy_grant():
    """handlers/kube.py's list of API verbs and the chart's ClusterRole agree on networkpolicies."""
    doc = kube.__doc__ or ""
    line = next(ln for ln in doc.splitlines() if "networkpolicies" in ln)
    verbs = {v.strip() for v in line.split("networkpolicies")[1].split("(")[0].split(",")}
    [grant] = [r for r in _rules(render(), "ClusterRole") if "networkpolicies" in r["resources"]]
    assert verbs == set(grant["verbs"])
