"""A child object the apiserver refused (400/422): which spec field caused it, in the user's words.

The SFTJob's own schema admits some values that core/v1 refuses (an affinity that is not a core/v1
Affinity, a toleration with an unknown operator, ...). Such a refusal is the user's input, not API trouble:
the SFTJob ends Failed/InvalidSpec naming the spec field and quoting the apiserver, instead of the operator
retrying the create forever.
"""

from __future__ import annotations

import json
from typing import Any

# Answers to a create that mean "this object is invalid" (retrying cannot help).
REJECTED_STATUSES = (400, 422)

# The trainer config is a pod annotation too (render/objects.CONFIG_ANNOTATION): it counts against the API
# server's 256 KiB cap on annotations beside the user's.
_POD_ANNOTATIONS = "spec.resources.podAnnotations (with the trainer config rendered from the spec)"

# Where a spec field lands in the rendered Job (longest prefix wins); the user's name for it.
_CHILD_TO_SPEC: tuple[tuple[str, str], ...] = (
    ("spec.template.metadata.labels", "spec.resources.podLabels"),
    ("spec.template.metadata.annotations", _POD_ANNOTATIONS),
    ("spec.template.annotations", _POD_ANNOTATIONS),  # where the total-size check points
    ("spec.template.spec.nodeSelector", "spec.resources.nodeSelector"),
    ("spec.template.spec.tolerations", "spec.resources.tolerations"),
    ("spec.template.spec.affinity", "spec.resources.affinity"),
    ("spec.template.spec.priorityClassName", "spec.resources.priorityClassName"),
    ("spec.template.spec.serviceAccountName", "spec.resources.serviceAccountName"),
    ("spec.template.spec.containers[0].image", "spec.resources.image"),
    ("spec.template.spec.containers[0].resources", "spec.resources (cpu, memory, gpusPerNode)"),
    ("spec.template.spec.volumes", "spec.resources.shmSize"),
    ("metadata.labels", "metadata.labels (Kueue labels copied to the Job)"),
)


def spec_field(child_field: str) -> str | None:
    """The SFTJob field a child object's field path comes from, if the operator knows it."""
    for prefix, field in _CHILD_TO_SPEC:
        if child_field == prefix or child_field.startswith((prefix + ".", prefix + "[")):
            return field
    return None


def _status(body: str | bytes | None) -> dict[str, Any]:
    try:
        out = json.loads(body or b"{}")
    except (ValueError, TypeError):
        return {"message": str(body or "")[:500]}
    return out if isinstance(out, dict) else {}


def rejection_message(kind: str, name: str, status: int, body: str | bytes | None) -> str:
    """`spec.resources.podLabels: the apiserver refused the train Job "x-train": <its message>`."""
    st = _status(body)
    causes = (st.get("details") or {}).get("causes") or []
    fields = [str(c.get("field") or "") for c in causes if isinstance(c, dict)]
    named = [f for f in (spec_field(f) for f in fields) if f]
    where = ", ".join(dict.fromkeys(named)) or "spec"
    message = str(st.get("message") or st.get("reason") or f"HTTP {status}")
    return f'{where}: the apiserver refused the {kind} "{name}" ({status}): {message}'[:1000]


def validation_message(kind: str, name: str, errors: list[dict[str, Any]]) -> str:
    """The same for a child the Kubernetes client refused before sending it (its pydantic models check the
    core/v1 types: a required field missing, a wrong type). `errors`: pydantic's `ValidationError.errors()`."""
    fields, details = [], []
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ())]
        while loc and loc[0].isdigit():  # the argument's position in the client call
            loc = loc[1:]
        child = ".".join(loc)
        fields.append(spec_field(child))
        details.append(f"{child}: {err.get('msg', '')}")
    where = ", ".join(dict.fromkeys(f for f in fields if f)) or "spec"
    return f'{where}: the Kubernetes API client refused the {kind} "{name}": {"; ".join(details)}'[:1000]
