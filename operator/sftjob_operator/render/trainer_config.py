"""SFTJob spec -> the trainer's config file (a pod-template annotation mounted at /etc/sftjob/config.yaml),
and the paths a cluster cannot resolve."""

from __future__ import annotations

import json
from typing import Any

from sftjob_api import GROUP, SFTJobSpec
from sftjob_api.layout import run_root
from sftjob_api.trainer_config import RunSection, TrainerConfig

CONFIG_FILE = "config.yaml"
CONFIG_DIR = "/etc/sftjob"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
# The trainer config travels in each stage's pod template, as this annotation, which a downward-API volume
# mounts at CONFIG_PATH: no ConfigMap to create (and delete) per SFTJob. The spec parts it is rendered from
# are immutable (crd.IMMUTABLE_PATHS), so every stage reads the same file. The API server caps an object's
# annotations at 256 KiB together; a larger config is refused at Job creation (InvalidSpec, with its message).
CONFIG_ANNOTATION = f"{GROUP}/trainer-config"
PVC_MOUNT_ROOT = "/mnt/pvc"


def input_uris(spec: SFTJobSpec) -> list[tuple[str, str | None]]:
    """(field path, uri) of everything the trainer reads: the model, its tokenizer, the dataset's files and
    the preference pairs'."""
    inputs: list[tuple[str, str | None]] = [
        ("spec.model.uri", spec.model.uri),
        ("spec.model.tokenizer", spec.model.tokenizer),
    ]
    inputs += [(f"spec.dataset.{path}", u) for path, u in spec.dataset.input_uris()]
    if spec.alignment is not None:
        inputs += [(f"spec.alignment.dataset.{path}", u) for path, u in spec.alignment.dataset.input_uris()]
    return inputs


def pvc_claims(spec: SFTJobSpec) -> list[str]:
    """PersistentVolumeClaims named by pvc://claim/path inputs, in first-seen order."""
    uris = [u for _, u in input_uris(spec)]
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def pvc_path(uri: str) -> str:
    """pvc://claim/path -> /mnt/pvc/claim/path, where the operator mounts the claim (read-only)."""
    if not uri.startswith("pvc://"):
        return uri
    claim, _, rest = uri.removeprefix("pvc://").partition("/")
    return f"{PVC_MOUNT_ROOT}/{claim}/{rest}"


def trainer_config(namespace: str, name: str, spec: SFTJobSpec) -> TrainerConfig:
    """The spec as the trainer sees it in a pod: pvc:// inputs become paths under the read-only mounts the
    pod templates add; the run's root is resolved."""
    model = spec.model.model_copy(
        update={
            "uri": pvc_path(spec.model.uri),
            "tokenizer": spec.model.tokenizer and pvc_path(spec.model.tokenizer),
        }
    )
    dataset = spec.dataset.with_uris(pvc_path)
    run = RunSection(
        namespace=namespace,
        name=name,
        output_root=run_root(spec, namespace, name),
        model_uri=spec.model.uri if model.uri != spec.model.uri else None,  # pvc:// became a pod path
    )
    alignment = spec.alignment and spec.alignment.model_copy(
        update={"dataset": spec.alignment.dataset.with_uris(pvc_path)}
    )
    fields = {**dict(spec), "model": model, "dataset": dataset, "alignment": alignment, "run": run}
    return TrainerConfig.model_validate(fields)


def render_trainer_config(namespace: str, name: str, spec: SFTJobSpec) -> dict[str, Any]:
    """The trainer config as plain data (JSON/YAML-serialisable), deterministic for a given spec."""
    return trainer_config(namespace, name, spec).model_dump(mode="json", exclude_none=True)


def _is_relative(uri: str) -> bool:
    return uri.startswith("./") or uri.startswith("../")


def cluster_output_error(spec: SFTJobSpec) -> str | None:
    """Paths a cluster cannot resolve: relative ones (the CRD accepts them because `sftjob run` resolves
    them against the manifest's directory on one machine). Only the operator knows it runs in a cluster, so
    this is an InvalidSpec it alone can detect. Outputs must be s3:// or an absolute path (a mounted volume).
    """
    for field, uri in input_uris(spec):
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


def render_config_file(namespace: str, name: str, spec: SFTJobSpec) -> str:
    """What the trainer reads at CONFIG_PATH. JSON is valid YAML (the trainer reads either); compact and
    sort_keys keep it small and byte-stable."""
    config = render_trainer_config(namespace, name, spec)
    return json.dumps(config, sort_keys=True, separators=(",", ":")) + "\n"


def config_volume(name: str) -> dict[str, Any]:
    """The pod volume holding CONFIG_FILE: the CONFIG_ANNOTATION of the pod itself (downward API)."""
    item = {"path": CONFIG_FILE, "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}
    return {"name": name, "downwardAPI": {"items": [item]}}
