"""The serving hand-off rules on the real kube-apiserver (the generated CRD's CEL): an adapter the server
named in spec.output.serving cannot load is refused when merge is disabled, naming the field and the reason,
and accepted when the merged model can be handed off instead (docs/serving.md)."""

from __future__ import annotations

import json

import pytest
from example_manifests import SERVING_INCOMPATIBLE, serving_manifest

from sftjob_api.crd import CRD_FILE, REPO_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def crd(kube):
    kube.apply_crd(REPO_ROOT / "crds" / CRD_FILE)
    return kube


def apply(kube, namespace: str, doc: dict, tmp_path, name: str):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return kube.kubectl("apply", "-n", namespace, "-f", str(path), check=False)


def test_each_incompatible_adapter_is_refused_without_merge_and_accepted_with_it(crd, namespace, tmp_path):
    for i, (server, lora, field) in enumerate(SERVING_INCOMPATIBLE):
        refused = apply(
            crd, namespace, serving_manifest(server, lora, False, name=f"off-{i}"), tmp_path, "off"
        )
        assert refused.returncode != 0, f"{server} {lora} without merge was accepted"
        assert field in refused.stderr and f"output.serving {server}: " in refused.stderr, refused.stderr
        assert "merge.enabled is false" in refused.stderr, refused.stderr
        accepted = apply(crd, namespace, serving_manifest(server, lora, True, name=f"on-{i}"), tmp_path, "on")
        assert accepted.returncode == 0, accepted.stderr
        stored = crd.get_json("sftjob", f"on-{i}", "-n", namespace)
        assert stored["spec"]["output"]["serving"] == server


def test_disabling_merge_later_is_refused_when_the_adapter_is_not_loadable(crd, namespace, tmp_path):
    apply(crd, namespace, serving_manifest("vllm", {"useDora": True}, True, name="later"), tmp_path, "later")
    patch = json.dumps({"spec": {"merge": {"enabled": False}}})
    refused = crd.kubectl(
        "patch", "sftjob", "later", "-n", namespace, "--type=merge", "-p", patch, check=False
    )
    assert refused.returncode != 0 and "spec.method.lora.useDora" in refused.stderr, refused.stderr


def test_serving_defaults_to_none(crd, namespace, tmp_path):
    doc = serving_manifest("none", {"useDora": True}, False, name="plain")
    del doc["spec"]["output"]["serving"]
    assert apply(crd, namespace, doc, tmp_path, "plain").returncode == 0
    assert crd.get_json("sftjob", "plain", "-n", namespace)["spec"]["output"]["serving"] == "none"
