"""SFTJob spec -> the trainer's config file (mounted from the ConfigMap at /etc/sftjob/config.yaml)."""

from __future__ import annotations

from typing import Any

from ..api import SFTJobSpec
from .artifacts import artifact_root, merge_enabled

CONFIG_FILE = "config.yaml"
PVC_MOUNT_ROOT = "/mnt/pvc"


def pvc_claims(spec: SFTJobSpec) -> list[str]:
    """PersistentVolumeClaims named by pvc://claim/path inputs, in first-seen order."""
    uris = [spec.model.uri, spec.model.tokenizer, *spec.dataset.train, *(spec.dataset.eval or [])]
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


def render_trainer_config(namespace: str, name: str, spec: SFTJobSpec) -> dict[str, Any]:
    """The trainer config as plain data (JSON/YAML-serialisable), deterministic for a given spec."""
    # Exactly the sections sftjob_trainer.config.TrainerConfig has (it forbids unknown keys).
    body = spec.model_dump(mode="json", by_alias=True, exclude={"suspend", "run_policy"})
    body["merge"]["enabled"] = merge_enabled(spec)
    # pvc:// inputs become paths under the read-only mounts the pod templates add.
    body["model"]["uri"] = pvc_path(body["model"]["uri"])
    if body["model"].get("tokenizer"):
        body["model"]["tokenizer"] = pvc_path(body["model"]["tokenizer"])
    body["dataset"]["train"] = [pvc_path(u) for u in body["dataset"]["train"]]
    if body["dataset"].get("eval"):
        body["dataset"]["eval"] = [pvc_path(u) for u in body["dataset"]["eval"]]
    return {
        "run": {"namespace": namespace, "name": name, "outputRoot": artifact_root(spec, namespace, name)},
        **body,
    }
