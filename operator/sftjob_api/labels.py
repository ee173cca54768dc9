"""Kubernetes' own rules for label and annotation keys and label values (core/v1 validation), written once:
as JSON-schema patterns and CEL for admission, and as Python checks for the operator and `sftjob run`.

A pod label longer than 63 characters or a nodeSelector key that is not a label name is refused by the
apiserver only when the operator creates the Job; checking them in the SFTJob's schema refuses them at
`kubectl apply`, naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

from .base import CelRule

# A label name: 63 characters at most, alphanumeric at both ends, `-_.` inside.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
# A DNS-1123 subdomain (the optional prefix of a key), each label at most 63 characters.
_PREFIX = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?([.][a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*"
QUALIFIED_NAME = rf"^({_PREFIX}/)?{_NAME}$"
MAX_KEY_LENGTH = 253 + 1 + 63
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
MAX_LABEL_VALUE = 63
MAX_ENTRIES = 64  # labels, annotations or nodeSelector entries per map (bounds the CEL cost)

LabelValue = Annotated[str, Field(max_length=MAX_LABEL_VALUE, pattern=LABEL_VALUE)]
AnnotationValue = Annotated[str, Field(max_length=65536)]

_QUALIFIED = re.compile(QUALIFIED_NAME)


def is_qualified_name(key: str) -> bool:
    """A valid label/annotation key: `[prefix/]name`, prefix a DNS subdomain of at most 253 characters."""
    if len(key) > MAX_KEY_LENGTH or not _QUALIFIED.match(key):
        return False
    prefix, _, _ = key.rpartition("/")
    return len(prefix) <= 253


def keys_rule(field: str, what: str) -> CelRule:
    """A CEL rule (and its Python twin) that every key of the map `field` is a qualified name."""
    return CelRule(
        cel=f"self.{field}.all(k, size(k) <= {MAX_KEY_LENGTH} && k.matches('{QUALIFIED_NAME}'))",
        message=f"every {what} key must be a Kubernetes label key: [prefix/]name, name at most 63"
        " characters of [A-Za-z0-9-_.] starting and ending alphanumeric, prefix a DNS subdomain",
        check=lambda s: all(is_qualified_name(k) for k in getattr(s, _snake(field))),
        field_path=f".{field}",
    )


def _snake(camel: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
