"""Prometheus scrape configs from the chart's PodMonitor and ServiceMonitor, the way the Prometheus Operator
generates them: `kubernetes_sd_configs` against the apiserver (role pod / endpoints) and relabelling that
keeps what the monitor selects. The Prometheus Operator cannot run here (no image registry), so this is its
translation for the fields our chart uses (selector matchLabels and matchExpressions, namespaceSelector,
endpoint port/path/interval), rule for rule after prometheus-operator's `pkg/prometheus/promcfg.go`; a field
it does not know fails loudly instead of being ignored. docs/observability.md shows the same config for a
Prometheus without the operator.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
KNOWN_ENDPOINT_KEYS = {"port", "interval", "path", "honorLabels"}


def sanitize(label: str) -> str:
    """A Kubernetes label key as Prometheus meta label suffix (sft.tuning.dev/job-name -> sft_tuning_dev_job_name)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _selector(selector: Obj, kind: str) -> list[Obj]:
    """keep-rules for a LabelSelector on `kind` (pod or service) labels."""
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ValueError(f"selector fields not translated: {sorted(unknown)}")
    rules: list[Obj] = []
    for key, value in (selector.get("matchLabels") or {}).items():
        k = sanitize(key)
        rules.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_{kind}_label_{k}",
                    f"__meta_kubernetes_{kind}_labelpresent_{k}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    for expr in selector.get("matchExpressions") or []:
        k, op = sanitize(expr["key"]), expr["operator"]
        if op == "Exists":
            rules.append(
                {
                    "action": "keep",
                    "source_labels": [f"__meta_kubernetes_{kind}_labelpresent_{k}"],
                    "regex": "true",
                }
            )
        elif op == "DoesNotExist":
            rules.append(
                {
                    "action": "drop",
                    "source_labels": [f"__meta_kubernetes_{kind}_labelpresent_{k}"],
                    "regex": "true",
                }
            )
        elif op in ("In", "NotIn"):
            values = "|".join(re.escape(v) for v in expr["values"])
            rules.append(
                {
                    "action": "keep" if op == "In" else "drop",
                    "source_labels": [
                        f"__meta_kubernetes_{kind}_label_{k}",
                        f"__meta_kubernetes_{kind}_labelpresent_{k}",
                    ],
                    "regex": f"({values});true",
                }
            )
        else:
            raise ValueError(f"matchExpressions operator {op!r} not translated")
    return rules


def _namespaces(monitor: Obj) -> Obj:
    ns_sel = monitor["spec"].get("namespaceSelector") or {}
    if ns_sel.get("any"):
        return {}
    names = ns_sel.get("matchNames") or [monitor["metadata"]["namespace"]]
    return {"namespaces": {"names": list(names)}}


def _endpoint(ep: Obj) -> Obj:
    unknown = set(ep) - KNOWN_ENDPOINT_KEYS
    if unknown:
        raise ValueError(f"endpoint fields not translated: {sorted(unknown)}")
    return {
        "honor_labels": bool(ep.get("honorLabels", False)),
        "metrics_path": ep.get("path", "/metrics"),
        **({"scrape_interval": ep["interval"]} if "interval" in ep else {}),
    }


# Both kinds: no target for a finished pod (the operator's default), and the standard target labels.
_DROP_FINISHED = {
    "action": "drop",
    "source_labels": ["__meta_kubernetes_pod_phase"],
    "regex": "(Failed|Succeeded)",
}
_POD_LABELS = [
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
]


def pod_monitor_configs(monitor: Obj, sd: Obj) -> list[Obj]:
    """One scrape config per podMetricsEndpoint of a PodMonitor; `sd` holds the kubernetes_sd_configs'
    connection (kubeconfig_file, or api_server + tls/authorization)."""
    spec, meta = monitor["spec"], monitor["metadata"]
    out = []
    for i, ep in enumerate(spec["podMetricsEndpoints"]):
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            _DROP_FINISHED,
            *_selector(spec.get("selector") or {}, "pod"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": ep["port"],
            },
            *_POD_LABELS,
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": ep["port"]},
        ]
        out.append(
            {
                "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{i}",
                "kubernetes_sd_configs": [{"role": "pod", **_namespaces(monitor), **sd}],
                **_endpoint(ep),
                "relabel_configs": relabel,
            }
        )
    return out


def service_monitor_configs(monitor: Obj, sd: Obj) -> list[Obj]:
    """One scrape config per endpoint of a ServiceMonitor (role endpoints; the job label is the Service's
    name, as the Prometheus Operator sets it)."""
    spec, meta = monitor["spec"], monitor["metadata"]
    out = []
    for i, ep in enumerate(spec["endpoints"]):
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            *_selector(spec.get("selector") or {}, "service"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_endpoint_port_name"],
                "regex": ep["port"],
            },
            {
                "source_labels": [
                    "__meta_kubernetes_endpoint_address_target_kind",
                    "__meta_kubernetes_endpoint_address_target_name",
                ],
                "separator": ";",
                "regex": "Pod;(.*)",
                "replacement": "${1}",
                "target_label": "pod",
            },
            _DROP_FINISHED,
            *_POD_LABELS,
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {
                "source_labels": ["__meta_kubernetes_service_name"],
                "target_label": "job",
                "replacement": "${1}",
            },
            {"target_label": "endpoint", "replacement": ep["port"]},
        ]
        out.append(
            {
                "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{i}",
                "kubernetes_sd_configs": [{"role": "endpoints", **_namespaces(monitor), **sd}],
                **_endpoint(ep),
                "relabel_configs": relabel,
            }
        )
    return out


def scrape_configs(docs: list[Obj], kubeconfig: Path) -> list[Obj]:
    """Scrape configs for every PodMonitor and ServiceMonitor among rendered chart objects."""
    sd = {"kubeconfig_file": str(kubeconfig)}
    out: list[Obj] = []
    for doc in docs:
        if doc.get("kind") == "PodMonitor":
            out += pod_monitor_configs(doc, sd)
        elif doc.get("kind") == "ServiceMonitor":
            out += service_monitor_configs(doc, sd)
    return out


def chart_monitors(release: str, namespace: str, values: Obj) -> list[Obj]:
    """The chart's PodMonitor and ServiceMonitor as `helm template` renders them with `values` (monitors on)."""
    import json
    import tempfile

    import yaml

    from .helm import CHART, helm

    values = {
        **values,
        "podMonitor": {**values.get("podMonitor", {}), "enabled": True},
        "serviceMonitor": {**values.get("serviceMonitor", {}), "enabled": True},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(values, f)
        f.flush()
        out = helm(
            "template", release, str(CHART), "-n", namespace, "-f", f.name, "--kube-version=1.34.0"
        ).stdout
    return [d for d in yaml.safe_load_all(out) if d and d.get("kind") in ("PodMonitor", "ServiceMonitor")]


def prometheus_identity(kube: Any, namespace: str) -> Path:
    """A kubeconfig for a ServiceAccount with what Prometheus' service discovery needs in `namespace` (the
    Prometheus Operator's documented RBAC: get/list/watch pods, services, endpoints), and nothing more."""
    path = kube.sa_kubeconfig(namespace, "prometheus")
    for args in (
        ["create", "role", "prometheus-sd", "--verb=get,list,watch", "--resource=pods,services,endpoints"],
        [
            "create",
            "rolebinding",
            "prometheus-sd",
            "--role=prometheus-sd",
            f"--serviceaccount={namespace}:prometheus",
        ],
    ):
        r = kube.kubectl(*args, "-n", namespace, check=False)
        if r.returncode != 0 and "already exists" not in r.stderr:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr}")
    return path
