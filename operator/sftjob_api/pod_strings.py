"""Spec strings that reach a pod as they are: LoRA module names (into the trainer's peft config) and the
trainer image (into the Job's container). Each is checked at admission against the grammar of what it names,
as a CEL rule with its Python twin, so a shell string or a typo is refused with its field path at
`kubectl apply` instead of failing in a pod.
"""

from __future__ import annotations

import re

from .base import CelRule

# A torch module name as peft matches it: dotted attribute names or ModuleList indexes (q_proj,
# model.layers.0.mlp.down_proj), or peft's "all-linear". No backslashes: the same text is a CEL string.
MODULE_NAME = r"^(all-linear|[A-Za-z0-9_]+([.][A-Za-z0-9_]+)*)$"

# An OCI image reference (distribution/reference's grammar, without IPv6 hosts):
# [host[:port]/]path[:tag][@digest], path components lower-case.
_HOST = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?([.][A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE = rf"^({_HOST}/)?{_COMPONENT}(/{_COMPONENT})*(:{_TAG})?(@{_DIGEST})?$"

_MODULE = re.compile(MODULE_NAME)
_IMAGE = re.compile(IMAGE_REFERENCE)


def is_module_name(text: str) -> bool:
    return _MODULE.match(text) is not None


def is_image_reference(text: str) -> bool:
    return _IMAGE.match(text) is not None


def module_names_rule(field: str, what: str) -> CelRule:
    """Every entry of the list `field` is a module name."""
    return CelRule(
        cel=f"self.{field}.all(m, m.matches('{MODULE_NAME}'))",
        message=f"every {what} entry must be a module name: dotted names of [A-Za-z0-9_]"
        " (q_proj, model.layers.0.mlp.down_proj) or all-linear",
        check=lambda lora: all(is_module_name(m) for m in getattr(lora, _SNAKE[field])),
        field_path=f".{field}",
    )


_SNAKE = {"targetModules": "target_modules", "modulesToSave": "modules_to_save"}

IMAGE_RULE = CelRule(
    cel=f"!has(self.image) || self.image.matches('{IMAGE_REFERENCE}')",
    message="resources.image must be an image reference: [registry[:port]/]name[:tag][@digest],"
    " name in lower case",
    check=lambda res: res.image is None or is_image_reference(res.image),
    field_path=".image",
)
