"""The trainer's config: the SFTJob spec sections (imported, never redefined) plus run/runtime sections.

Torch-free so the operator can render and validate it. The file is what
`sftjob_operator.render.trainer_config.render_trainer_config` writes (camelCase keys, JSON or YAML):
`run` + the spec's `model, dataset, method, training, resources, output, eval, merge` + optional `runtime`.
Rank and world size are not config: they come from torchrun's environment (see `DistEnv`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pydantic import Field, ValidationError

from sftjob_operator.api.base import ApiModel
from sftjob_operator.api.resource import format_error
from sftjob_operator.api.spec import (
    DatasetSpec,
    EvalSpec,
    MergeSpec,
    MethodSpec,
    ModelSpec,
    OutputSpec,
    ResourcesSpec,
    TrainingSpec,
)

from .exit_codes import PermanentError

CONFIG_ENV = "SFTJOB_CONFIG"


class RunSection(ApiModel):
    """Which SFTJob this is and where its artifacts go (resolved by the operator)."""

    namespace: str = Field(default="default", max_length=253)
    name: str = Field(default="local", max_length=253)
    output_root: str = Field(min_length=1, max_length=2048)
    """`<output.uri>/<namespace>/<name>/`: checkpoints/, adapter/ (or model/ for full) are written below."""


class RuntimeSection(ApiModel):
    """Process-level settings; environment variables override the file (the pod spec sets them)."""

    metrics_port: int = Field(default=9400, ge=0, le=65535)
    """Rank r listens on metrics_port + local_rank; 0 disables the endpoint."""
    work_dir: str = "/tmp/sftjob"
    """Local scratch: model cache, checkpoint staging."""
    model_cache_dir: str | None = None
    """Where s3:// models are mirrored (default <work_dir>/models); reused across restarts when on a PVC."""
    log_every_steps: int = Field(default=1, ge=1)
    termination_log: str | None = None
    """File for the failure message (Kubernetes terminationMessagePath)."""


class TrainerConfig(ApiModel):
    run: RunSection
    model: ModelSpec
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)


@dataclass(frozen=True)
class DistEnv:
    """torchrun's environment (single process when absent)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env() -> DistEnv:
        return DistEnv(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                       int(os.environ.get("LOCAL_RANK", "0")))


def parse_config(data: object, source: str = "config") -> TrainerConfig:
    try:
        cfg = TrainerConfig.model_validate(data)
    except ValidationError as e:
        raise PermanentError(f"invalid trainer config {source}: {'; '.join(format_error(err) for err in e.errors())}") from e
    env = os.environ
    rt = cfg.runtime
    updates: dict[str, object] = {}
    if "SFTJOB_METRICS_PORT" in env:
        updates["metrics_port"] = int(env["SFTJOB_METRICS_PORT"])
    if "SFTJOB_TERMINATION_LOG" in env:
        updates["termination_log"] = env["SFTJOB_TERMINATION_LOG"]
    if "SFTJOB_WORK_DIR" in env:
        updates["work_dir"] = env["SFTJOB_WORK_DIR"]
    if updates:
        cfg = cfg.model_copy(update={"runtime": rt.model_copy(update=updates)})
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
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PermanentError(f"config {path} is neither JSON nor YAML: {e}") from e
    return parse_config(data, path)
