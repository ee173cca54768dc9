"""`spec.resources.tolerations` and `affinity`: the core/v1 Toleration and Affinity shapes, with a cap on every
list and string.

They were free-form objects (x-kubernetes-preserve-unknown-fields): one SFTJob could carry ~1 MB of them,
and a few dozen such SFTJobs exhausted the operator's memory. With every list and string bounded, the API
server (structural schema: maxItems, maxLength, maxProperties) and pydantic refuse the same oversized input,
naming the field. The caps are far above what a real scheduling constraint uses; the largest accepted
affinity is ~280 KB of JSON (docs/api.md). Enum values (`operator`, `effect`) and core/v1's required fields are
still judged by the apiserver when the Job is created (render/rejected.py names the field).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field

from .base import ApiModel, CelRule
from .labels import MAX_KEY_LENGTH, MAX_LABEL_VALUE

MAX_TERMS = 4  # terms per list (nodeSelectorTerms, preferred..., required...)
MAX_REQUIREMENTS = 4  # matchExpressions / matchFields / matchLabels entries per selector or term
MAX_VALUES = 8  # values per requirement, namespaces per term
MAX_TOLERATIONS = 64

Key = Annotated[str, Field(max_length=MAX_KEY_LENGTH)]
Operator = Annotated[str, Field(max_length=16)]
Value = Annotated[str, Field(max_length=MAX_LABEL_VALUE)]


class LabelSelectorRequirement(ApiModel):
    """A label selector requirement (core/v1 LabelSelectorRequirement)."""

    key: Key
    """Label key (node or pod label)."""
    operator: Operator
    """In, NotIn, Exists, DoesNotExist (nodes also Gt, Lt; tolerations Exists, Equal)."""
    values: list[Value] | None = Field(default=None, max_length=MAX_VALUES)
    """Values the operator compares with."""


class LabelSelector(ApiModel):
    """A label selector (meta/v1 LabelSelector)."""

    match_labels: dict[str, Value] | None = Field(default=None, max_length=MAX_REQUIREMENTS)
    """Labels that must all match."""
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=MAX_REQUIREMENTS
    )
    """Requirements that must all hold."""

    # A structural schema cannot bound a map's keys: CEL does (the size alone keeps the CEL cost small;
    # the key's syntax is judged at the Job create).
    cel_rules = (
        CelRule(
            cel=f"!has(self.matchLabels) || self.matchLabels.all(k, size(k) <= {MAX_KEY_LENGTH})",
            message=f"every matchLabels key must be at most {MAX_KEY_LENGTH} characters",
            check=lambda s: all(len(k) <= MAX_KEY_LENGTH for k in s.match_labels or {}),
            field_path=".matchLabels",
        ),
    )


class NodeSelectorRequirement(ApiModel):
    """A node selector requirement (core/v1 NodeSelectorRequirement)."""

    key: Key
    """Label key (node or pod label)."""
    operator: Operator
    """In, NotIn, Exists, DoesNotExist (nodes also Gt, Lt; tolerations Exists, Equal)."""
    values: list[Value] | None = Field(default=None, max_length=MAX_VALUES)  # label values, node names
    """Values the operator compares with."""


class NodeSelectorTerm(ApiModel):
    """A node selector term (core/v1 NodeSelectorTerm): its requirements are ANDed."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(default=None, max_length=MAX_REQUIREMENTS)
    """Requirements that must all hold."""
    match_fields: list[NodeSelectorRequirement] | None = Field(default=None, max_length=MAX_REQUIREMENTS)
    """Requirements on node fields (metadata.name)."""


class NodeSelector(ApiModel):
    """A node selector (core/v1 NodeSelector): its terms are ORed."""

    node_selector_terms: list[NodeSelectorTerm] | None = Field(default=None, max_length=MAX_TERMS)
    """Terms, any of which must match."""


class PreferredSchedulingTerm(ApiModel):
    """A weighted node selector term (core/v1 PreferredSchedulingTerm)."""

    weight: int
    """Weight (1-100) of the term."""
    preference: NodeSelectorTerm | None = None
    """The preferred node selector term."""


class NodeAffinity(ApiModel):
    """Node affinity (core/v1 NodeAffinity)."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Required at scheduling."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = Field(
        default=None, max_length=MAX_TERMS
    )
    """Preferred at scheduling, by weight."""


class PodAffinityTerm(ApiModel):
    """A pod (anti-)affinity term (core/v1 PodAffinityTerm)."""

    label_selector: LabelSelector | None = None
    """Pods this term selects."""
    namespace_selector: LabelSelector | None = None
    """Namespaces the selected pods are in."""
    namespaces: list[Annotated[str, Field(max_length=MAX_LABEL_VALUE)]] | None = Field(
        default=None, max_length=MAX_VALUES
    )
    """Namespaces the selected pods are in (by name)."""
    topology_key: Key | None = None
    """Node label key that defines co-location."""
    match_label_keys: list[Key] | None = Field(default=None, max_length=MAX_REQUIREMENTS)
    """Label keys of this pod added to the selector (In)."""
    mismatch_label_keys: list[Key] | None = Field(default=None, max_length=MAX_REQUIREMENTS)
    """Label keys of this pod added to the selector (NotIn)."""


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod (anti-)affinity term (core/v1 WeightedPodAffinityTerm)."""

    weight: int
    """Weight (1-100) of the term."""
    pod_affinity_term: PodAffinityTerm | None = None
    """The weighted pod affinity term."""


class PodAffinity(ApiModel):
    """Pod affinity or anti-affinity (core/v1 PodAffinity / PodAntiAffinity)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        default=None, max_length=MAX_TERMS
    )
    """Required at scheduling."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(
        default=None, max_length=MAX_TERMS
    )
    """Preferred at scheduling, by weight."""


class Affinity(ApiModel):
    """Pod affinity (core/v1 Affinity)."""

    node_affinity: NodeAffinity | None = None
    """Node affinity."""
    pod_affinity: PodAffinity | None = None
    """Pod affinity."""
    pod_anti_affinity: PodAffinity | None = None
    """Pod anti-affinity."""


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: Key | None = None
    """Label key (node or pod label)."""
    operator: Operator | None = None
    """In, NotIn, Exists, DoesNotExist (nodes also Gt, Lt; tolerations Exists, Equal)."""
    value: Value | None = None
    """Taint value to match."""
    effect: Annotated[str, Field(max_length=32)] | None = None
    """Taint effect to match: NoSchedule, PreferNoSchedule, NoExecute."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


# spec.resources fields the operator reads only to render a child Job. Its index and kopf's diff base keep a
# digest of them instead (up to ~300 KB per SFTJob otherwise); a Job create reads the SFTJob in full.
CHILD_ONLY_FIELDS = ("tolerations", "affinity")


def split_child_only(spec: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A copy of `spec` without the child-only fields, and a digest of what they held (None: none set)."""
    out = json.loads(json.dumps(dict(spec)))
    resources = out.get("resources")
    if not isinstance(resources, dict):
        return out, None
    taken = {f: resources.pop(f) for f in CHILD_ONLY_FIELDS if f in resources}
    if not taken:
        return out, None
    text = json.dumps(taken, sort_keys=True, separators=(",", ":"))
    return out, hashlib.sha256(text.encode()).hexdigest()
