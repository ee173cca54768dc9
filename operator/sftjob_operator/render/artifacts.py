"""Artifact locations of a run: <output.uri>/<namespace>/<name>/{checkpoints,adapter,eval,merged}/."""

from __future__ import annotations

from ..api import SFTJobSpec


def artifact_root(spec: SFTJobSpec, namespace: str, name: str) -> str:
    return f"{spec.output.uri.rstrip('/')}/{namespace}/{name}/"


def artifacts(spec: SFTJobSpec, namespace: str, name: str) -> dict[str, str]:
    """status.artifacts (camelCase keys), computed from the spec alone."""
    root = artifact_root(spec, namespace, name)
    out = {
        "root": root,
        "checkpoints": root + "checkpoints/",
        "adapter": root + "adapter/",
        "manifest": root + "manifest.json",
    }
    if spec.eval.enabled:
        out["eval"] = root + "eval/"
    if merge_enabled(spec):
        out["merged"] = spec.merge.uri or root + "merged/"
    return out


def merge_enabled(spec: SFTJobSpec) -> bool:
    """Merging folds an adapter into the base model: nothing to merge for method full."""
    return spec.merge.enabled and spec.method.type != "full"


def cluster_output_error(spec: SFTJobSpec) -> str | None:
    """In a cluster the output must be s3:// or an absolute path (a mounted PVC).

    The CRD accepts relative local paths because `sftjob run` on one machine does; only the operator knows it
    runs in a cluster, so this is an InvalidSpec it alone can detect.
    """
    for field, uri in (("spec.output.uri", spec.output.uri), ("spec.merge.uri", spec.merge.uri)):
        if uri is not None and not (uri.startswith("s3://") or uri.startswith("/")):
            return (
                f"{field}: {uri!r} is a local relative path; in a cluster use s3://bucket/prefix"
                " or an absolute path on a mounted volume"
            )
    return None
