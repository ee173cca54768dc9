"""Generate the SFTJob CustomResourceDefinition from the pydantic models (the single source of truth).

python -m sftjob_api.crd            # print the CRD YAML
python -m sftjob_api.crd --write    # update crds/ (copy it to helm/sftjob-operator/crds/ too)
python -m sftjob_api.crd --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import sys
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from . import resource
from .base import ApiModel
from .generated import REPO_ROOT, generated_file_main
from .spec import SFTJobSpec
from .status import SFTJobStatus

CRD_FILE = f"{resource.GROUP}_{resource.PLURAL}.yaml"

# Run-defining parts of the spec are immutable once created (CEL transition rules); scheduling
# hints, suspend and the run policy stay editable, and so does the group's size (resources.nodes and
# gpusPerNode): checkpoints resume at any world size, and a new size takes effect at the next group start.
IMMUTABLE_PATHS = (
    ("model",),
    ("dataset",),
    ("method",),
    ("training",),
    ("output",),
    ("resources", "deepspeed"),
)

# Only the API server checks metadata (pydantic's pattern on ObjectMeta.name does it in Python).
ROOT_RULES = [
    {
        "rule": f"self.metadata.name.matches('{resource.NAME_PATTERN}')",
        "message": "metadata.name must be a DNS-1035 label (lower-case letters, digits, '-', starting"
        " with a letter) of at most 42 characters, so derived Job and pod names stay within 63",
    }
]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from `root`, by the name pydantic uses in $defs."""
    found: dict[str, type[BaseModel]] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel) and tp.__name__ not in found:
            found[tp.__name__] = tp
            for f in tp.model_fields.values():
                visit(f.annotation)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return found


def _factory_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """Defaults pydantic leaves out of its JSON schema (default_factory), by wire name."""
    out: dict[str, Any] = {}
    for name, f in cls.model_fields.items():
        if f.default_factory is None:
            continue
        value = f.default_factory()  # type: ignore[call-arg]
        # A nested object defaults to its fully defaulted form: the API server checks each default
        # against the CEL rules as written, without first applying the defaults nested inside it.
        out[f.alias or name] = (
            value.model_dump(mode="json", exclude_none=True) if isinstance(value, BaseModel) else value
        )
    return out


def _unwrap_optional(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema.get("anyOf")
    if options is None:
        return schema
    real = [o for o in options if o.get("type") != "null"]
    if len(real) != 1:
        raise ValueError(f"unsupported union in schema: {schema}")
    merged = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    if schema.get("default") is not None:
        merged["default"] = schema["default"]
    return {**real[0], **merged}


class _Converter:
    """JSON Schema (pydantic, 2020-12 flavour) -> Kubernetes structural OpenAPI v3."""

    def __init__(self, json_schema: dict[str, Any], root: type[BaseModel]):
        self.defs = json_schema.get("$defs", {})
        self.classes = _model_classes(root)

    def convert(self, schema: dict[str, Any]) -> dict[str, Any]:
        schema = _unwrap_optional(schema)
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            target = self.convert(self.defs[name])
            overrides = {k: v for k, v in schema.items() if k != "$ref"}
            return {**target, **self.convert_keywords(overrides)}
        return self.convert_keywords(schema)

    def convert_keywords(self, schema: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in ("title", "$defs"):
                continue
            if key == "description":
                out[key] = " ".join(str(value).split())  # docstrings wrap; kubectl explain re-wraps
            elif key == "const":
                out["enum"] = [value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                out[key] = True
            elif key == "additionalProperties":
                if value is True:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                elif isinstance(value, dict):
                    out[key] = self.convert(value)
                # `false` is implied by a structural schema with properties (unknown fields are pruned)
            elif key == "items":
                out[key] = self.convert(value)
            elif key == "properties":
                out[key] = {k: self.convert(v) for k, v in value.items()}
            else:
                out[key] = value
        if "properties" in out:
            cls = self.classes.get(str(schema.get("title", "")))
            if cls is not None:
                for prop, default in _factory_defaults(cls).items():
                    out["properties"][prop].setdefault("default", default)
        return out


def openapi_schema(model: type[ApiModel]) -> dict[str, Any]:
    """The structural schema of one top-level model (spec or status)."""
    json_schema = model.model_json_schema(by_alias=True, mode="validation")
    return _Converter(json_schema, model).convert(json_schema)


# What a refused change (often a GitOps sync) says: the field, and the two ways to run the new spec. Keep
# "is immutable": Flux's force re-create recognises immutable-field errors by it (docs/gitops.md).
IMMUTABLE_MESSAGE = (
    "{field} is immutable once the SFTJob is created: to run with a different value, give the SFTJob a new"
    " name, or delete and re-create it (docs/gitops.md)"
)


def _add_immutability(spec_schema: dict[str, Any]) -> None:
    for path in IMMUTABLE_PATHS:
        node = spec_schema
        for part in path:
            node = node["properties"][part]
        dotted = "spec." + ".".join(path)
        node.setdefault("x-kubernetes-validations", []).append(
            {"rule": "self == oldSelf", "message": IMMUTABLE_MESSAGE.format(field=dotted)}
        )


def build_crd() -> dict[str, Any]:
    spec = openapi_schema(SFTJobSpec)
    _add_immutability(spec)
    status = openapi_schema(SFTJobStatus)
    schema = {
        "type": "object",
        "description": resource.SFTJob.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},  # the API server forbids anything else here
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": ROOT_RULES,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.PLURAL}.{resource.GROUP}"},
        "spec": {
            "group": resource.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.KIND,
                "listKind": f"{resource.KIND}List",
                "plural": resource.PLURAL,
                "singular": resource.SINGULAR,
                "shortNames": resource.SHORT_NAMES,
                "categories": resource.CATEGORIES,
            },
            "versions": [
                {
                    "name": resource.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


class _NoAliases(yaml.SafeDumper):
    """Spell out every repeated sub-schema: `&id001`/`*id001` anchors would only confuse readers."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_crd_yaml() -> str:
    header = "# Generated by `python -m sftjob_api.crd --write`. Do not edit.\n"
    return header + yaml.dump(build_crd(), Dumper=_NoAliases, sort_keys=False, width=110)


def main(argv: list[str] | None = None) -> int:
    return generated_file_main(
        argv, __doc__, REPO_ROOT / "crds" / CRD_FILE, render_crd_yaml, "sftjob_api.crd"
    )


if __name__ == "__main__":
    sys.exit(main())
