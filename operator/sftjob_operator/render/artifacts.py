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


def checkpoint_uri(spec: SFTJobSpec, namespace: str, name: str, step: int) -> str:
    """The prefix of the trainer's checkpoint of `step` (sftjob_trainer.checkpoint.step_dir under the root)."""
    return f"{artifact_root(spec, namespace, name)}checkpoints/step-{step}/"


def merge_enabled(spec: SFTJobSpec) -> bool:
    """Merging folds an adapter into the base model: nothing to merge for method full."""
    return spec.merge.enabled and spec.method.type != "full"


def _is_relative(uri: str) -> bool:
    return uri.startswith("./") or uri.startswith("../")


def cluster_output_error(spec: SFTJobSpec) -> str | None:
    """Paths a cluster cannot resolve: relative ones (the CRD accepts them because `sftjob run` resolves
    them against the manifest's directory on one machine). Only the operator knows it runs in a cluster, so
    this is an InvalidSpec it alone can detect. Outputs must be s3:// or an absolute path (a mounted volume).
    """
    inputs: list[tuple[str, str | None]] = [
        ("spec.model.uri", spec.model.uri),
        ("spec.model.tokenizer", spec.model.tokenizer),
    ]
    inputs += [(f"spec.dataset.train.{i}", u) for i, u in enumerate(spec.dataset.train)]
    inputs += [(f"spec.dataset.eval.{i}", u) for i, u in enumerate(spec.dataset.eval or [])]
    for field, uri in inputs:
        if uri is not None and _is_relative(uri):
            return (
                f"{field}: {uri!r} is a path relative to the manifest (only `sftjob run` resolves those);"
                " in a cluster use s3://, pvc://claim/path or an absolute path"
            )
    for field, out in (("spec.output.uri", spec.output.uri), ("spec.merge.uri", spec.merge.uri)):
        if out is not None and not (out.startswith("s3://") or out.startswith("/")):
            return (
                f"{field}: {out!r} is a local relative path; in a cluster use s3://bucket/prefix"
                " or an absolute path on a mounted volume"
            )
    return None
