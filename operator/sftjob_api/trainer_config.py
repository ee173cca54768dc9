"""The trainer's config file: the SFTJob spec itself (all its sections, same wire names and rules) plus
`run` (which SFTJob, where its artifacts go) and `runtime` (process settings).

The operator renders it into every stage's pod template (`sftjob_operator.render.trainer_config`; an
annotation mounted as a file), `sftjob run` into its work directory; the trainer reads it
(`sftjob_trainer.config.load_config`). Rank and world size are not config: they come from torchrun's
environment.
"""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel
from .spec import SFTJobSpec
from .stage_table import Stage, final_stage

# The run's identity reaches the trainer as an environment variable, not in the config file: the operator sets
# it to the SFTJob's metadata.uid in every pod (render/objects.py), `sftjob run` to the id kept in its work
# directory. It names the run's checkpoint prefix (Layout.run_checkpoints) and is recorded in every marker.
RUN_ID_ENV = "SFTJOB_RUN_ID"
# A trainer started by hand, without either of them.
DEFAULT_RUN_ID = "local"


class RunSection(ApiModel):
    """Which SFTJob this is and where its artifacts go (resolved by whoever renders the config)."""

    namespace: str = Field(default="default", max_length=253)
    name: str = Field(default="local", max_length=253)
    output_root: str = Field(min_length=1, max_length=2048)
    """`<output.uri>/<namespace>/<name>/` (layout.run_root): every artifact key is relative to it."""
    model_uri: str | None = Field(default=None, max_length=1024)
    """spec.model.uri as the user wrote it, when model.uri was rewritten to a local directory (`sftjob run`)."""


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


class TrainerConfig(SFTJobSpec):
    """The spec (inherited, never re-listed) + run + runtime."""

    run: RunSection
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    def base_model_reference(self) -> str:
        """The base model as the spec names it, for adapter_config.json and serving/serving.json: never the
        trainer's local copy (a pod-local path means nothing to a server)."""
        return self.run.model_uri or self.model.uri

    def is_final(self, stage: Stage) -> bool:
        """Whether `stage` is the last one this spec runs (it then writes manifest.json)."""
        return final_stage(self) == stage
