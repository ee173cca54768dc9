"""The per-SFTJob NetworkPolicy (issue 25, item 7), rendered offline: schema-valid, peers by the job-name
label VALUE, metrics only from the configured scrapers, no egress rule without destinations, link-local
and the API server excluded. (Enforcement needs a policy controller; the test bed has none.)"""

from __future__ import annotations

import ipaddress
from typing import Any

import kubernetes_validate as kv
import pytest

from sftjob_operator.render.names import LABEL_JOB_NAME
from sftjob_operator.render.network_policy import NetworkPolicyOptions, render_network_policy
from sftjob_operator.render.objects import METRICS_PORT, SFTJobRef
from sftjob_operator.settings import from_args

REF = SFTJobRef(name="llama", namespace="team-a", uid="u-1")
PROM = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def policy(opts: NetworkPolicyOptions | None = None) -> dict[str, Any]:
    return render_network_policy(REF, opts or NetworkPolicyOptions(metrics_from=(PROM,)), METRICS_PORT)


def ip_blocks(p: dict[str, Any]) -> dict[str, list[str]]:
    return {
        peer["ipBlock"]["cidr"]: peer["ipBlock"].get("except", [])
        for rule in p["spec"]["egress"]
        for peer in rule["to"]
        if "ipBlock" in peer
    }


@pytest.mark.parametrize(
    "opts",
    [
        NetworkPolicyOptions(metrics_from=(PROM,)),
        NetworkPolicyOptions(),  # no scrapers, defaults
        NetworkPolicyOptions(egress_cidrs=("10.0.0.0/8",)).excluding("10.96.0.1"),
        NetworkPolicyOptions(dns_to=(), egress_cidrs=()),
    ],
)
def test_validates_against_the_kubernetes_schema(opts: NetworkPolicyOptions) -> None:
    kv.validate(policy(opts), "1.34", strict=True)


def test_owned_by_the_sftjob_and_selects_its_pods_by_value() -> None:
    p = policy()
    own = {"matchLabels": {LABEL_JOB_NAME: "llama"}}
    assert p["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert p["metadata"]["namespace"] == "team-a" and p["metadata"]["name"] == "llama-network"
    assert p["spec"]["podSelector"] == own and p["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # the old chart policy matched the label KEY (`Exists`): any SFTJob's pod reached the rendezvous port
    selectors = [
        peer["podSelector"] for rule in p["spec"]["ingress"] for peer in rule["from"] if "podSelector" in peer
    ]
    assert selectors == [own]
    assert "matchExpressions" not in str(p)


def test_ingress_from_outside_the_run_only_on_the_metrics_port() -> None:
    own_rule, metrics_rule = policy()["spec"]["ingress"]
    assert "ports" not in own_rule  # rendezvous, NCCL/gloo: whatever ports they pick
    assert metrics_rule == {"from": [PROM], "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]}
    assert len(policy(NetworkPolicyOptions())["spec"]["ingress"]) == 1  # no scrapers: no such rule


def test_no_egress_rule_without_destinations() -> None:
    # an egress rule without `to` allows every address: none may be rendered, whatever is configured
    for opts in (NetworkPolicyOptions(), NetworkPolicyOptions(dns_to=(), egress_cidrs=(), egress_ports=())):
        assert all(rule.get("to") for rule in policy(opts)["spec"]["egress"])
    dns = policy()["spec"]["egress"][1]
    assert [p["port"] for p in dns["ports"]] == [53, 53] and dns["to"][0]["podSelector"]["matchLabels"] == {
        "k8s-app": "kube-dns"
    }


def test_egress_excludes_link_local_and_the_api_server() -> None:
    blocks = ip_blocks(policy(NetworkPolicyOptions().excluding("10.96.0.1", "fd00::1")))
    assert blocks == {
        "0.0.0.0/0": ["169.254.0.0/16", "10.96.0.1/32"],
        "::/0": ["fe80::/10", "fd00:ec2::254/128", "fd00::1/128"],
    }
    # an exception outside a CIDR would be refused by the API: dropped for that CIDR only
    narrow = ip_blocks(
        policy(NetworkPolicyOptions(egress_cidrs=("10.0.0.0/8", "169.254.0.0/16")).excluding("10.96.0.1"))
    )
    assert narrow == {"10.0.0.0/8": ["10.96.0.1/32"], "169.254.0.0/16": []}
    for cidr, excepts in blocks.items():
        assert all(ipaddress.ip_network(e).subnet_of(ipaddress.ip_network(cidr)) for e in excepts)  # type: ignore[arg-type]


def test_settings_from_the_environment() -> None:
    assert from_args([], env={}).network_policy is None  # not asked for: no policy
    s = from_args(
        [], env={"SFTJOB_NETWORK_POLICY": '{"egressPorts": [443], "metricsFrom": [{"podSelector": {}}]}'}
    )
    assert s.network_policy == NetworkPolicyOptions(egress_ports=(443,), metrics_from=({"podSelector": {}},))
    assert from_args(["--network-policy", "{}"], env={}).network_policy == NetworkPolicyOptions()
    for bad in ("[]", '{"egressCidrs": ["10.0.0/8x"]}', "{"):
        with pytest.raises(SystemExit, match="--network-policy"):
            from_args(["--network-policy", bad], env={})
