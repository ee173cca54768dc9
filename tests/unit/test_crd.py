"""The generated CRD: committed copy is current, schema is structural and self-describing."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import yaml

from sftjob_api import crd
from sftjob_api.base import ApiModel
from sftjob_api.spec import SFTJobSpec, TrainingSpec


def _schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_committed_crd_equals_generator_output():
    assert crd.main(["--check"]) == 0, "run: python -m sftjob_api.crd --write"


def test_crd_is_valid_against_the_kubernetes_schema():
    doc = yaml.safe_load((crd.REPO_ROOT / "crds" / crd.CRD_FILE).read_text())
    kubernetes_validate.validate(doc, "1.34", strict=True)


def test_every_field_has_a_description_and_a_type():
    for path, node in _walk(_schema(), "root"):
        if path.endswith("[]") or path == "root.metadata":  # metadata may only say type: object
            continue
        assert node.get("description"), f"{path} has no description"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"


def test_schema_is_structural():
    forbidden = {"anyOf", "oneOf", "allOf", "$ref", "const", "title", "additionalProperties"}
    for path, node in _walk(_schema(), "root"):
        bad = forbidden & node.keys()
        if bad == {"additionalProperties"} and "properties" not in node:
            continue  # maps (dict[str, str]) are allowed
        assert not bad, f"{path} uses {bad}"
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(key) in (None, True), f"{path}.{key} must be a boolean in OpenAPI v3"


def test_every_cel_rule_of_every_model_is_in_the_crd():
    text = json.dumps(crd.build_crd())
    seen = 0
    for cls in crd._model_classes(SFTJobSpec).values():
        assert issubclass(cls, ApiModel)
        for rule in cls.cel_rules:
            assert rule.message in text
            seen += 1
    assert seen >= 10


def test_nested_objects_default_to_their_fully_defaulted_form():
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["training"]["default"] == TrainingSpec().model_dump(mode="json", exclude_none=True)
    assert spec["training"]["default"]["globalBatchSize"] == 16
    assert spec["training"]["properties"]["learningRate"]["default"] == 2e-4
    assert spec["method"]["properties"]["lora"]["properties"]["targetModules"]["default"] == ["all-linear"]
    assert "default" not in spec["method"]["properties"]["quantization"]  # optional: unset means absent


def test_run_defining_fields_are_immutable():
    spec = _schema()["properties"]["spec"]["properties"]
    for field in ("model", "dataset", "method", "training", "output"):
        rules = spec[field]["x-kubernetes-validations"]
        assert {
            "rule": "self == oldSelf",
            "message": crd.IMMUTABLE_MESSAGE.format(field=f"spec.{field}"),
        } in rules
    assert "x-kubernetes-validations" not in spec["resources"]["properties"]["tolerations"]
    # the group's size stays editable: checkpoints resume at any world size (docs/recovery.md, elastic runs)
    for field in ("nodes", "gpusPerNode"):
        assert "x-kubernetes-validations" not in spec["resources"]["properties"][field]


def test_printer_columns_and_names():
    version = crd.build_crd()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Progress",
        "Loss",
        "ETA",
        "Nodes",
        "Reason",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}
    names = crd.build_crd()["spec"]["names"]
    assert names["shortNames"] == ["sft"] and "all" in names["categories"]
