"""`spec.resources`: where and on what the trainer pods run (nodes, GPUs, quantities, image, placement, and
how DeepSpeed shards the ranks). Part of the SFTJob spec (spec.py); every field's docstring is its CRD
description."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel, CelRule
from .labels import MAX_ENTRIES, AnnotationValue, LabelValue, keys_rule
from .pod_strings import IMAGE_RULE
from .scheduling import MAX_TOLERATIONS, Affinity, Toleration

QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO settings."""

    zero_stage: int = Field(default=3, ge=0, le=3)
    """ZeRO stage: 3 shards parameters, gradients and optimizer state across ranks."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state in host memory."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in host memory (ZeRO-3 only)."""

    cel_rules = (
        CelRule(
            cel="self.offloadParams == 'none' || self.zeroStage == 3",
            message="offloadParams requires zeroStage 3",
            check=lambda d: d.offload_params == "none" or d.zero_stage == 3,
            field_path=".offloadParams",
        ),
    )


class ResourcesSpec(ApiModel):
    """Where and on what the trainer pods run."""

    nodes: int = Field(default=1, ge=1, le=512)
    """Number of trainer pods (one per node); pod 0 is the rendezvous master."""
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """nvidia.com/gpu per pod, one rank per GPU; 0 trains on CPU with one rank per pod."""
    cpu: str | None = Field(default=None, pattern=QUANTITY, max_length=32)
    """CPU request and limit per pod (Kubernetes quantity)."""
    memory: str | None = Field(default=None, pattern=QUANTITY, max_length=32)
    """Memory request and limit per pod (Kubernetes quantity)."""
    shm_size: str = Field(default="8Gi", pattern=QUANTITY, max_length=32)
    """Size of the /dev/shm emptyDir NCCL uses."""
    image: str | None = Field(default=None, max_length=512)
    """Trainer image (an image reference: [registry[:port]/]name[:tag][@digest]); the operator's default
    when unset."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    """Node labels the pods must match (label keys and values)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_TOLERATIONS)
    """Pod tolerations (core/v1 Toleration; lists and strings capped: sftjob_api/scheduling.py)."""
    affinity: Affinity | None = None
    """Pod affinity (core/v1 Affinity; lists and strings capped: sftjob_api/scheduling.py)."""
    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass of the pods."""
    service_account_name: str | None = Field(default=None, max_length=253)
    """ServiceAccount of the pods; the chart's trainer account (no API permissions) when unset."""
    pod_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    """Extra labels on every pod (label keys; values at most 63 characters)."""
    pod_annotations: dict[str, AnnotationValue] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    """Extra annotations on every pod."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed ZeRO settings."""

    cel_rules = (
        keys_rule("nodeSelector", "resources.nodeSelector"),
        keys_rule("podLabels", "resources.podLabels"),
        keys_rule("podAnnotations", "resources.podAnnotations"),
        IMAGE_RULE,
    )
