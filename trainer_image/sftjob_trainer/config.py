"""Reading the trainer config (`sftjob_api.trainer_config.TrainerConfig`: the spec + run + runtime) and
torchrun's environment. Torch-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml
from pydantic import ValidationError

from sftjob_api.exit_codes import PermanentError
from sftjob_api.resource import format_error
from sftjob_api.trainer_config import TrainerConfig

CONFIG_ENV = "SFTJOB_CONFIG"
# Environment variables the pod spec sets that override `runtime` (Kubernetes knows them, the spec does not).
RUNTIME_ENV = {
    "SFTJOB_METRICS_PORT": "metrics_port",
    "SFTJOB_TERMINATION_LOG": "termination_log",
    "SFTJOB_WORK_DIR": "work_dir",
}


@dataclass(frozen=True)
class DistEnv:
    """torchrun's environment (single process when absent)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env() -> DistEnv:
        env = os.environ
        return DistEnv(
            int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
        )


def parse_config(data: object, source: str = "config") -> TrainerConfig:
    """Validate a config document (raises PermanentError naming every bad field), then apply RUNTIME_ENV."""
    try:
        cfg = TrainerConfig.model_validate(data)
    except ValidationError as e:
        errors = "; ".join(format_error(err) for err in e.errors())
        raise PermanentError(f"invalid trainer config {source}: {errors}") from e
    updates = {field: os.environ[var] for var, field in RUNTIME_ENV.items() if var in os.environ}
    if updates:
        runtime = type(cfg.runtime).model_validate({**cfg.runtime.model_dump(by_alias=False), **updates})
        cfg = cfg.model_copy(update={"runtime": runtime})
    return cfg


def load_config(path: str | None = None) -> TrainerConfig:
    """Read the config file (JSON or YAML) from `path` or $SFTJOB_CONFIG."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise PermanentError(f"no config: pass --config PATH or set {CONFIG_ENV}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise PermanentError(f"cannot read config {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PermanentError(f"config {path} is neither JSON nor YAML: {e}") from e
    return parse_config(data, path)
