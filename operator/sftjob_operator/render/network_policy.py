"""The NetworkPolicy of one SFTJob (issue 25, item 7): its pods accept connections only from each other
(rendezvous, NCCL/gloo) and, on the metrics port, from the configured scrapers (the operator's progress
reader, Prometheus); they reach only each other, DNS, and the configured egress CIDRs/ports minus link-local
(cloud metadata) and the API server.

One policy per SFTJob because "the same label value" cannot be said in one chart-level policy: each selects
`job-name=<name>` for both its pods and its peers. Created with the SFTJob's ownerReference, like the
Service, so it goes with the SFTJob.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from .names import LABEL_JOB_NAME, ChildNames, labels, owner_reference
from .objects import SFTJobRef

Obj = dict[str, Any]

COMPONENT = "network"
DNS_PORT = 53
# kube-dns/CoreDNS as kubeadm, kind, EKS, GKE and AKS deploy it.
KUBE_DNS: Obj = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
# Link-local (cloud metadata: 169.254.169.254, fd00:ec2::254 on AWS IPv6) is never a data store.
LINK_LOCAL = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")


@dataclass(frozen=True)
class NetworkPolicyOptions:
    """Operator-wide inputs (the chart's networkPolicy values, as JSON in SFTJOB_NETWORK_POLICY)."""

    # NetworkPolicyPeers allowed on the trainer metrics port; the chart adds the operator's own pods.
    metrics_from: tuple[Obj, ...] = ()
    dns_to: tuple[Obj, ...] = (KUBE_DNS,)
    egress_ports: tuple[int, ...] = (443, 80, 9000, 8333)
    egress_cidrs: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    egress_except: tuple[str, ...] = LINK_LOCAL

    @classmethod
    def from_json(cls, text: str) -> NetworkPolicyOptions:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("network policy settings must be a JSON object")
        d = cls()
        opts = cls(
            metrics_from=tuple(raw.get("metricsFrom", d.metrics_from)),
            dns_to=tuple(raw.get("dnsTo", d.dns_to)),
            egress_ports=tuple(int(p) for p in raw.get("egressPorts", d.egress_ports)),
            egress_cidrs=tuple(str(c) for c in raw.get("egressCidrs", d.egress_cidrs)),
            egress_except=tuple(str(c) for c in raw.get("egressExcept", d.egress_except)),
        )
        for cidr in opts.egress_cidrs + opts.egress_except:
            ipaddress.ip_network(cidr)  # ValueError on a typo, at start rather than on the first SFTJob
        return opts

    def excluding(self, *addresses: str) -> NetworkPolicyOptions:
        """These addresses (e.g. the API server's) added to the egress exceptions."""
        extra = [str(ipaddress.ip_network(a, strict=False)) for a in addresses]
        return NetworkPolicyOptions(
            self.metrics_from, self.dns_to, self.egress_ports, self.egress_cidrs,
            tuple(dict.fromkeys(self.egress_except + tuple(extra))),
        )  # fmt: skip


def _ip_blocks(cidrs: tuple[str, ...], excepts: tuple[str, ...]) -> list[Obj]:
    """One ipBlock per CIDR with the exceptions that lie strictly inside it (the API refuses others)."""
    out: list[Obj] = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        inside = []
        for e in excepts:
            ex = ipaddress.ip_network(e, strict=False)
            if ex.version == net.version and ex != net and ex.subnet_of(net):  # type: ignore[arg-type]
                inside.append(str(ex))
        block: Obj = {"cidr": str(net)}
        if inside:
            block["except"] = inside
        out.append({"ipBlock": block})
    return out


def render_network_policy(ref: SFTJobRef, opts: NetworkPolicyOptions, metrics_port: int) -> Obj:
    name = ref.name
    own: Obj = {"podSelector": {"matchLabels": {LABEL_JOB_NAME: name}}}
    ingress: list[Obj] = [{"from": [own]}]  # all ports: rendezvous, NCCL/gloo pick theirs
    if opts.metrics_from:
        ingress.append(
            {"from": list(opts.metrics_from), "ports": [{"port": metrics_port, "protocol": "TCP"}]}
        )
    # An egress rule with an empty `to` allows every destination: rules without peers are left out.
    egress: list[Obj] = [{"to": [own]}]
    if opts.dns_to:
        dns = [{"port": DNS_PORT, "protocol": "UDP"}, {"port": DNS_PORT, "protocol": "TCP"}]
        egress.append({"to": list(opts.dns_to), "ports": dns})
    if opts.egress_cidrs and opts.egress_ports:
        egress.append(
            {
                "to": _ip_blocks(opts.egress_cidrs, opts.egress_except),
                "ports": [{"port": p, "protocol": "TCP"} for p in opts.egress_ports],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": ChildNames(name).network_policy,
            "namespace": ref.namespace,
            "labels": labels(name, COMPONENT),
            "ownerReferences": [owner_reference(name, ref.uid)],
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB_NAME: name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }
