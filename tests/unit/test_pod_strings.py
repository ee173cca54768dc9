"""Strings that reach a pod (LoRA module names, the trainer image) are checked against their grammar:
every form a user writes is accepted, shell text is refused (examples/invalid/ has one refusal per rule,
checked by pydantic in test_api.py and by the real apiserver's CEL in test_crd_apiserver.py)."""

from __future__ import annotations

import pytest
import yaml

from sftjob_api.crd import REPO_ROOT
from sftjob_api.pod_strings import is_image_reference, is_module_name

IMAGES = [
    "busybox",
    "ghcr.io/sftjob/trainer:0.1.0",
    "nvcr.io/nvidia/pytorch:24.01-py3",
    "localhost/sftjob-trainer:3f2a9c",  # the test bed's podman-built images
    "registry.internal:5000/team/ml/trainer@sha256:" + "a" * 64,
    "my_registry.example.com/a__b/c-d:v1.2_rc",
]
NOT_IMAGES = [
    "",
    "trainer:1 && id",
    "ghcr.io/x;ls",
    "$(id)",
    "x:tag with space",
    "x:",
    "Trainer/UPPER:1",
    "a//b",
]
MODULES = ["q_proj", "all-linear", "model.layers.0.mlp.down_proj", "lm_head", "c_attn"]
NOT_MODULES = ["", "q_proj; rm -rf /", "$(id)", "a..b", ".q_proj", "q_proj.", "mlp.*", "all-linears"]


@pytest.mark.parametrize("ref", IMAGES)
def test_image_references_are_accepted(ref: str) -> None:
    assert is_image_reference(ref)


@pytest.mark.parametrize("ref", NOT_IMAGES)
def test_non_references_are_refused(ref: str) -> None:
    assert not is_image_reference(ref)


@pytest.mark.parametrize("name", MODULES)
def test_module_names_are_accepted(name: str) -> None:
    assert is_module_name(name)


@pytest.mark.parametrize("name", NOT_MODULES)
def test_non_module_names_are_refused(name: str) -> None:
    assert not is_module_name(name)


def test_the_charts_default_trainer_image_is_a_reference() -> None:
    values = yaml.safe_load((REPO_ROOT / "helm" / "sftjob-operator" / "values.yaml").read_text())
    assert is_image_reference(values["trainerImage"])
