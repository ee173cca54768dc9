"""GitOps re-syncs on the real kube-apiserver: every example manifest, applied the way Argo CD (client-side
apply) or Flux (server-side apply) does and run by the operator, is unchanged by a re-apply
(resourceVersion does not move, `kubectl diff` is empty); the operator never writes spec; a changed
immutable field is refused with the field named and what to do; children are owned (not tracked by Argo CD)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from example_manifests import EXAMPLES
from sftjob_operator_e2e_fixtures import Operator, jobs, status
from testbed.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GITOPS_RUNS = EXAMPLES / "gitops" / "sftjobs"
# What each apply mode does: Argo CD's default (kubectl's client-side apply, last-applied annotation) and
# Flux's (server-side apply as kustomize-controller, forcing conflicts).
MODES = {
    "argocd-client-side": ["apply"],
    "flux-server-side": [
        "apply",
        "--server-side",
        "--field-manager=kustomize-controller",
        "--force-conflicts",
    ],
}
SETTLED_REASONS = {"Queued"}  # Kueue examples wait for an admission that never comes on the test bed


def example_objects(kube: Any) -> list[dict[str, Any]]:
    """Every applicable example: examples/*.yaml and examples/kind/*.yaml, and examples/gitops/sftjobs/
    rendered by kubectl's kustomize (Argo CD and Flux both render it with kustomize)."""
    docs: list[dict[str, Any]] = []
    for path in sorted([*EXAMPLES.glob("*.yaml"), *(EXAMPLES / "kind").glob("*.yaml")]):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    rendered = kube.kubectl("kustomize", str(GITOPS_RUNS)).stdout
    docs += [d for d in yaml.safe_load_all(rendered) if d]
    for d in docs:
        d["metadata"].pop("namespace", None)  # each test runs in its own namespace
    return docs


def _apply(kube: Any, mode: str, namespace: str, path: Path) -> None:
    kube.kubectl(*MODES[mode], "-n", namespace, "-f", str(path))


def _versions(kube: Any, namespace: str, docs: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for d in docs:
        ref = f"{d['kind']}/{d['metadata']['name']}"
        out[ref] = kube.get_json(d["kind"].lower(), d["metadata"]["name"], "-n", namespace)["metadata"][
            "resourceVersion"
        ]
    return out


def _settled(kube: Any, namespace: str, names: list[str]) -> bool:
    for name in names:
        st = status(kube, namespace, name)
        if (
            st.get("phase") not in ("Succeeded", "Failed", "Suspended")
            and st.get("reason") not in SETTLED_REASONS
        ):
            return False
    return True


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reapplying_every_example_is_a_no_op(
    sftjob_crd: Any, namespace: str, operator: Operator, mode: str, tmp_path: Path
) -> None:
    kube = sftjob_crd
    docs = example_objects(kube)
    sftjobs = [d["metadata"]["name"] for d in docs if d["kind"] == "SFTJob"]
    assert len(sftjobs) >= 7, sftjobs
    manifest = tmp_path / "examples.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    _apply(kube, mode, namespace, manifest)
    wait_until(lambda: _settled(kube, namespace, sftjobs), 150, "every example run settled", interval=1.0)

    # Quiet: nothing (operator, Job controller, kopf) writes the objects any more.
    def quiet() -> dict[str, str] | None:
        before = _versions(kube, namespace, docs)
        time.sleep(3)
        return before if _versions(kube, namespace, docs) == before else None

    before = wait_until(quiet, 60, "objects stop changing", interval=0.1)

    _apply(kube, mode, namespace, manifest)
    after = _versions(kube, namespace, docs)
    changed = {ref: (before[ref], after[ref]) for ref in before if before[ref] != after[ref]}
    assert not changed, f"re-apply ({mode}) changed: {changed}"

    diff_flags = (
        ["--server-side", "--field-manager=kustomize-controller", "--force-conflicts"]
        if "server" in mode
        else []
    )
    diff = kube.kubectl("diff", *diff_flags, "-n", namespace, "-f", str(manifest), check=False)
    assert diff.returncode == 0, f"kubectl diff ({mode}) shows drift:\n{diff.stdout}{diff.stderr}"

    for name in sftjobs:
        obj = kube.get_json("sftjob", name, "-n", namespace)
        # The operator never wrote spec: generation counts spec changes only.
        assert obj["metadata"]["generation"] == 1, (name, obj["metadata"]["generation"])
        spec_writers = {
            m["manager"]
            for m in obj["metadata"].get("managedFields") or []
            if "f:spec" in (m.get("fieldsV1") or {}) and m.get("subresource") != "status"
        }
        assert spec_writers <= {"kubectl-client-side-apply", "kubectl", "kustomize-controller"}, (
            name,
            spec_writers,
        )

    # Children are owned by their SFTJob: Argo CD shows them under it and never tracks or prunes them.
    owned_kinds = ("jobs", "services")
    for kind in owned_kinds:
        for child in kube.get_json(kind, "-n", namespace, "-l", "sft.tuning.dev/job-name")["items"]:
            refs = child["metadata"].get("ownerReferences") or []
            assert any(r["kind"] == "SFTJob" and r.get("controller") for r in refs), (
                kind,
                child["metadata"]["name"],
            )
    assert jobs(kube, namespace), "the operator created no children: nothing was checked"


def test_changing_an_immutable_field_is_refused_with_what_to_do(
    sftjob_crd: Any, namespace: str, tmp_path: Path
) -> None:
    kube = sftjob_crd
    (doc,) = [d for d in example_objects(kube) if d["metadata"]["name"] == "support-bot-v1"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    kube.kubectl("apply", "-n", namespace, "-f", str(path))

    doc["spec"]["training"] = {"learningRate": 5e-5}
    path.write_text(yaml.safe_dump(doc))
    r = kube.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert r.returncode != 0
    assert "spec.training" in r.stderr and "is immutable" in r.stderr, r.stderr  # Flux's force matches this
    assert "new name" in r.stderr and "delete and re-create" in r.stderr, r.stderr  # what to do

    # Editable fields stay editable from Git.
    doc["spec"].pop("training")
    doc["spec"]["suspend"] = True
    doc["spec"]["runPolicy"]["backoffLimit"] = 5
    path.write_text(yaml.safe_dump(doc))
    kube.kubectl("apply", "-n", namespace, "-f", str(path))

    # Delete and re-create (Argo CD Replace=true,Force=true; Flux force: true) takes the new spec.
    doc["spec"]["training"] = {"learningRate": 5e-5}
    path.write_text(yaml.safe_dump(doc))
    uid = kube.get_json("sftjob", "support-bot-v1", "-n", namespace)["metadata"]["uid"]
    kube.kubectl("replace", "--force", "-n", namespace, "-f", str(path))
    obj = kube.get_json("sftjob", "support-bot-v1", "-n", namespace)
    assert obj["metadata"]["uid"] != uid and obj["spec"]["training"]["learningRate"] == 5e-5
    print(json.dumps({"immutable-field error": r.stderr.strip()}))
