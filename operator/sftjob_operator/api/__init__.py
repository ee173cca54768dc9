"""The SFTJob API (sft.tuning.dev/v1alpha1). Pure pydantic: no Kubernetes client imports."""

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
from .spec import IMMUTABLE_FIELDS, SFTJobSpec
from .status import TERMINAL_PHASES, Condition, Phase, SFTJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "IMMUTABLE_FIELDS",
    "KIND",
    "PLURAL",
    "TERMINAL_PHASES",
    "VERSION",
    "Condition",
    "Phase",
    "SFTJob",
    "SFTJobSpec",
    "SFTJobStatus",
    "SpecError",
    "parse_sftjob",
    "parse_spec",
]
