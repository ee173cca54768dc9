"""SFTJobs for the admin policy (sftjob_api/policy.py), shared by the unit tests (the operator's check) and
the e2e test (the chart's ValidatingAdmissionPolicy on the real apiserver)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import yaml
from example_manifests import EXAMPLES, valid_examples

BUCKET = "sftjob"  # the bucket of the chart's default admissionPolicy.uriPrefixes

# Values beyond the default policy, so that the host, priority class and key rules refuse something too.
STRICT = {
    "hosts": ["https://mlflow.example.com", "mlflow.mlflow.svc.cluster.local"],  # the first over https only
    "priorityClasses": ["training-high"],
    "podLabelKeys": ["team", "example.com/*"],
    "podAnnotationKeys": ["example.com/*"],
}


def shipped_sftjobs() -> list[tuple[str, dict[str, Any]]]:
    """Every SFTJob manifest in examples/ (by file name)."""
    paths = valid_examples() + sorted((EXAMPLES / "gitops" / "sftjobs").glob("sftjob-*.yaml"))
    paths.append(EXAMPLES / "kind" / "sftjob-cpu.yaml")
    return [(p.name, yaml.safe_load(p.read_text())) for p in paths]


def in_namespace_prefix(doc: Any, namespace: str) -> Any:
    """The examples name their own buckets (s3://models/..., s3://artifacts/sft) or local paths (./data/...);
    under the default policy each moves below the namespace's prefix: s3://B/K -> s3://sftjob/<ns>/B/K,
    ./K -> s3://sftjob/<ns>/K. Model-cache names, hosts and everything else stay."""
    if isinstance(doc, dict):
        return {k: in_namespace_prefix(v, namespace) for k, v in doc.items()}
    if isinstance(doc, list):
        return [in_namespace_prefix(v, namespace) for v in doc]
    if isinstance(doc, str) and doc.startswith("s3://"):
        return f"s3://{BUCKET}/{namespace}/{doc[5:]}"
    if isinstance(doc, str) and doc.startswith("./"):
        return f"s3://{BUCKET}/{namespace}/{doc[2:]}"
    return doc


def allowed(namespace: str, name: str = "allowed") -> dict[str, Any]:
    """An SFTJob every rule of the default (and STRICT) policy lets through in `namespace`."""
    own = f"s3://{BUCKET}/{namespace}"
    return {
        "apiVersion": "sft.tuning.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": f"{own}/models/m", "tokenizer": "smollm2-135m-instruct"},
            "dataset": {"train": [f"{own}/data/a.jsonl"], "eval": [f"{own}/data/e.jsonl"]},
            "resources": {
                "podLabels": {"team": "nlp"},
                "podAnnotations": {"example.com/owner": "nlp"},
                "priorityClassName": "training-high",
            },
            "output": {
                "uri": f"s3://{BUCKET}",
                "endpoint": "https://mlflow.example.com",
                "credentialsSecret": {"name": "s3-credentials"},
            },
            "merge": {"uri": f"{own}/served/m"},
            "training": {"resumeFrom": f"{own}/earlier-run/adapter/"},
            "alignment": {
                "dataset": {"train": [f"{own}/data/pairs.jsonl"], "eval": [f"{own}/data/pairs-e.jsonl"]}
            },
            "tracking": {
                "mlflow": {
                    "trackingUri": "http://mlflow.mlflow.svc.cluster.local:5000",
                    "credentialsSecret": {"name": "sftjob-mlflow"},
                }
            },
        },
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return apply


def _sources(doc: dict[str, Any]) -> None:
    doc["spec"]["dataset"] = {"sources": [{"name": "a", "files": ["s3://other-team/a.jsonl"]}]}


# (the field every refusal must name, how the SFTJob breaks it, policy: "default" or "strict")
VIOLATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("spec.model.uri", _set("spec.model.uri", "s3://sftjob/other-team/models/m"), "default"),
    ("spec.model.tokenizer", _set("spec.model.tokenizer", "s3://models/tok"), "default"),
    ("spec.dataset.train", _set("spec.dataset.train", ["/etc/passwd"]), "default"),
    ("spec.dataset.sources", _sources, "default"),
    ("spec.dataset.eval", _set("spec.dataset.eval", ["/data/e.jsonl"]), "default"),
    (
        "spec.alignment.dataset.train",
        _set("spec.alignment.dataset.train", ["s3://sftjob/other-team/pairs.jsonl"]),
        "default",
    ),
    ("spec.alignment.dataset.eval", _set("spec.alignment.dataset.eval", ["/data/pairs.jsonl"]), "default"),
    ("spec.output.uri", _set("spec.output.uri", "s3://sftjob/other-team"), "default"),
    ("spec.merge.uri", _set("spec.merge.uri", "s3://sftjob/other-team/served/m"), "default"),
    (
        "spec.training.resumeFrom",
        _set("spec.training.resumeFrom", "s3://sftjob/other-team/run/checkpoints/0c5e/step-9/"),
        "default",
    ),
    ("spec.resources.image", _set("spec.resources.image", "evil.example.com/trainer:1"), "default"),
    ("spec.resources.serviceAccountName", _set("spec.resources.serviceAccountName", "default"), "default"),
    ("spec.output.credentialsSecret.name", _set("spec.output.credentialsSecret.name", "admin"), "default"),
    (
        "spec.tracking.mlflow.credentialsSecret.name",
        _set("spec.tracking.mlflow.credentialsSecret.name", "admin"),
        "default",
    ),
    ("spec.output.endpoint", _set("spec.output.endpoint", "http://169.254.169.254"), "strict"),
    ("spec.output.endpoint", _set("spec.output.endpoint", "http://mlflow.example.com"), "strict"),
    (
        "spec.tracking.mlflow.trackingUri",
        _set("spec.tracking.mlflow.trackingUri", "http://evil.io"),
        "strict",
    ),
    (
        "spec.resources.priorityClassName",
        _set("spec.resources.priorityClassName", "system-node-critical"),
        "strict",
    ),
    ("spec.resources.podLabels", _set("spec.resources.podLabels", {"app": "prometheus"}), "strict"),
    (
        "spec.resources.podAnnotations",
        _set("spec.resources.podAnnotations", {"sidecar.io/inject": "x"}),
        "strict",
    ),
]


def violating(
    namespace: str, case: tuple[str, Callable[[dict[str, Any]], None], str], i: int
) -> dict[str, Any]:
    doc = copy.deepcopy(allowed(namespace, f"bad-{i}"))
    case[1](doc)
    return doc
