"""The operator-trainer contract (sft.tuning.dev/v1alpha1): torch-free and kopf-free.

Everything `sftjob_operator` and `sftjob_trainer` must agree on, written once: the SFTJob spec and status
models (the CRD is generated from them), the trainer config (the spec plus run/runtime), exit codes, the
stages a spec runs and the artifact layout, the trainer's metric names, eval results and gates, the store
and the manifest. Both packages depend on this one; neither imports the other.
"""

from .layout import Layout
from .resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    SFTJob,
    SpecError,
    parse_sftjob,
    parse_spec,
)
from .spec import SFTJobSpec
from .stage_table import STAGE_TABLE, Stage, curate_enabled, final_stage, merge_enabled, stages
from .status import TERMINAL_PHASES, Condition, Phase, Reason, SFTJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "STAGE_TABLE",
    "TERMINAL_PHASES",
    "VERSION",
    "Condition",
    "Layout",
    "Phase",
    "Reason",
    "SFTJob",
    "SFTJobSpec",
    "SFTJobStatus",
    "SpecError",
    "Stage",
    "curate_enabled",
    "final_stage",
    "merge_enabled",
    "parse_sftjob",
    "parse_spec",
    "stages",
]
