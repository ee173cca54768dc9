"""The `SFTJob` resource: identity constants, the top-level model and parsing with readable errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from .base import CEL_ERROR, ApiModel
from .spec import SFTJobSpec
from .status import SFTJobStatus

GROUP = "sft.tuning.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SFTJob"
PLURAL = "sftjobs"
SINGULAR = "sftjob"
SHORT_NAMES = ["sft"]
CATEGORIES = ["all", "ml", "training"]

# Children are named <name>-train etc. and pods <name>-train-<index>; a DNS-1035 label of at most
# 42 characters keeps every derived name (Service, Job, pod hostname) within 63.
NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$"
# What the API server allows for a namespace; checked here for `sftjob run`, where no API server does.
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class ObjectMeta(ApiModel):
    """The parts of metadata the operator reads."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: str = Field(pattern=NAME_PATTERN)
    """Name: a DNS-1035 label of at most 42 characters."""
    namespace: str | None = Field(default=None, pattern=NAMESPACE_PATTERN)
    """Namespace: a DNS-1123 label (`sftjob run` derives local paths from it)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels (kueue.x-k8s.io/queue-name is passed on to the child Jobs)."""


class SFTJob(ApiModel):
    """A supervised fine-tuning job."""

    api_version: Literal["sft.tuning.dev/v1alpha1"] = "sft.tuning.dev/v1alpha1"
    """API version."""
    kind: Literal["SFTJob"] = "SFTJob"
    """Kind."""
    metadata: ObjectMeta
    """Object metadata."""
    spec: SFTJobSpec
    """What to train and how."""
    status: SFTJobStatus | None = None
    """Observed state."""


class SpecError(ValueError):
    """An invalid SFTJob; `errors` holds one "field.path: message" line per problem."""

    def __init__(self, errors: list[str], source: str = "SFTJob"):
        self.errors = errors
        super().__init__(f"invalid {source}:\n" + "\n".join(f"  - {e}" for e in errors))


def format_error(err: Any, root: str = "") -> str:
    """One pydantic error as "field.path: message" (under `root`), with a CEL rule's own field path
    (".training.globalBatchSize") appended."""
    path = ".".join(str(p) for p in (root, *err["loc"]) if str(p))
    if err["type"] == CEL_ERROR:
        path = (path + err["ctx"]["field_path"]).lstrip(".")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{path}: {msg}" if path else msg


def parse_sftjob(doc: dict[str, Any], source: str = "SFTJob") -> SFTJob:
    """Validate a manifest (as applied with kubectl) into an SFTJob, or raise SpecError."""
    try:
        return SFTJob.model_validate(doc)
    except ValidationError as exc:
        raise SpecError([format_error(e) for e in exc.errors()], source) from None


def parse_spec(spec: dict[str, Any]) -> SFTJobSpec:
    """Validate just `.spec` (the operator receives metadata separately); raise SpecError."""
    try:
        return SFTJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError([format_error(e, "spec") for e in exc.errors()]) from None
