"""The generated CRD on the real kube-apiserver: every invalid example is refused with its field path
and rule, defaults match pydantic's, run-defining fields are immutable, kubectl explain/get work."""

from __future__ import annotations

import json

import pytest
import yaml
from example_manifests import EXAMPLES, invalid_examples, valid_examples

from sftjob_api import parse_sftjob
from sftjob_api.crd import CRD_FILE, REPO_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def crd(kube):
    kube.apply_crd(REPO_ROOT / "crds" / CRD_FILE)
    return kube


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.path.stem)
def test_api_server_refuses_invalid_example_naming_field(crd, namespace, example):
    result = crd.kubectl("apply", "-n", namespace, "-f", str(example.path), check=False)
    assert result.returncode != 0, f"{example.path.name} was accepted"
    assert example.field in result.stderr, result.stderr
    if example.message:
        assert example.message in result.stderr, result.stderr


@pytest.mark.parametrize("path", valid_examples(), ids=lambda p: p.name)
def test_api_server_defaults_equal_pydantic_defaults(crd, namespace, path):
    crd.kubectl("apply", "-n", namespace, "-f", str(path))
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    stored = crd.get_json("sftjob", name, "-n", namespace)
    ours = parse_sftjob(yaml.safe_load(path.read_text())).spec.model_dump(mode="json", exclude_none=True)
    assert stored["spec"] == ours


def test_run_defining_fields_are_immutable_but_suspend_is_not(crd, namespace):
    path = EXAMPLES / "sftjob-minimal.yaml"
    crd.kubectl("apply", "-n", namespace, "-f", str(path))
    patch = json.dumps({"spec": {"training": {"learningRate": 0.001}}})
    refused = crd.kubectl(
        "patch", "sftjob", "minimal", "-n", namespace, "--type=merge", "-p", patch, check=False
    )
    assert refused.returncode != 0
    assert "spec.training is immutable once the SFTJob is created" in refused.stderr
    crd.kubectl(
        "patch", "sftjob", "minimal", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    assert crd.get_json("sftjob", "minimal", "-n", namespace)["spec"]["suspend"] is True


def test_kubectl_explain_shows_field_descriptions(crd):
    out = crd.kubectl("explain", "sftjob.spec.method.lora").stdout
    assert "Adapter settings" in out and "useRslora" in out and "Rank-stabilised" in out


def test_kubectl_get_shows_printer_columns_and_short_name(crd, namespace):
    crd.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "sftjob-minimal.yaml"))
    header = crd.kubectl("get", "sft", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "NODES", "AGE"]
    assert "minimal" in crd.kubectl("get", "all", "-n", namespace).stdout
