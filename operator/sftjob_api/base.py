"""Shared pieces of the SFTJob API models: camelCase wire names and cross-field rules.

A cross-field rule is written once, as a `CelRule`: the CEL expression the API server enforces
(`x-kubernetes-validations` in the generated CRD) next to the Python predicate the operator and
`sftjob run` enforce. Tests feed the same invalid manifests to both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError

CEL_ERROR = "cel_rule"


@dataclass(frozen=True)
class CelRule:
    """A cross-field rule: `cel` for the API server, `check` for Python; both must agree."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None  # relative to the object the rule sits on, e.g. ".microBatchSize"

    def to_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # Carry the CEL rules into the JSON schema so the CRD generator finds them on each object.
        schema = handler.resolve_ref_schema(handler(core_schema))
        if cls.cel_rules:
            schema["x-kubernetes-validations"] = [r.to_schema() for r in cls.cel_rules]
        return schema

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if not rule.check(self):
                # A custom error type keeps the rule's field path, so errors name the exact field
                # just as the API server does with the CEL rule's fieldPath.
                raise PydanticCustomError(
                    CEL_ERROR, "{message}", {"message": rule.message, "field_path": rule.field_path or ""}
                )
        return self
