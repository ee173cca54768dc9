"""SFTJob spec -> the trainer's config file (mounted from the ConfigMap at /etc/sftjob/config.yaml)."""

from __future__ import annotations

from typing import Any

from ..api import SFTJobSpec
from .artifacts import artifact_root, merge_enabled

CONFIG_FILE = "config.yaml"


def render_trainer_config(namespace: str, name: str, spec: SFTJobSpec) -> dict[str, Any]:
    """The trainer config as plain data (JSON/YAML-serialisable), deterministic for a given spec."""
    # Exactly the sections sftjob_trainer.config.TrainerConfig has (it forbids unknown keys).
    body = spec.model_dump(mode="json", by_alias=True, exclude={"suspend", "run_policy"})
    body["merge"]["enabled"] = merge_enabled(spec)
    return {
        "run": {"namespace": namespace, "name": name, "outputRoot": artifact_root(spec, namespace, name)},
        **body,
    }
