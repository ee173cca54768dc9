"""examples/gitops/ and docs/gitops.md stay true to the repository: the Argo CD Application and the Flux
Kustomization point at the runs directory, which kustomize renders into valid SFTJobs; the Flux health
check names our kind; the health table covers every reason the operator can write."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from gitops.health_table import doc_table
from sftjob_api import API_VERSION, KIND, Reason, parse_sftjob

REPO = Path(__file__).resolve().parents[2]
GITOPS = REPO / "examples" / "gitops"
LOCAL_ONLY = {Reason.MODEL_NOT_FOUND, Reason.INTERRUPTED}  # `sftjob run` only, never in a cluster


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_argocd_and_flux_sync_the_runs_directory() -> None:
    (app,) = docs(GITOPS / "argocd" / "application.yaml")
    assert app["kind"] == "Application" and app["apiVersion"] == "argoproj.io/v1alpha1"
    assert (REPO / app["spec"]["source"]["path"]).resolve() == GITOPS / "sftjobs"
    repo, ks = docs(GITOPS / "flux" / "kustomization.yaml")
    assert (repo["kind"], ks["kind"]) == ("GitRepository", "Kustomization")
    assert ks["spec"]["sourceRef"] == {"kind": "GitRepository", "name": repo["metadata"]["name"]}
    assert (REPO / ks["spec"]["path"]).resolve() == GITOPS / "sftjobs"
    (check,) = ks["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == (API_VERSION, KIND)
    assert "'Failed'" in check["failed"] and "'Succeeded'" in check["current"]


def test_the_runs_directory_renders_into_valid_sftjobs() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(GITOPS / "sftjobs")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    runs = [d for d in yaml.safe_load_all(rendered) if d]
    assert runs and all(d["kind"] == KIND for d in runs)
    for run in runs:
        parse_sftjob(run)  # the API's own validation (the CRD's rules are checked by test_sync_safe_e2e)


def test_the_health_table_covers_every_reason_the_operator_writes() -> None:
    documented = {reason for _, reason, _ in doc_table()}
    missing = sorted(r.value for r in Reason if r not in LOCAL_ONLY and r.value not in documented)
    assert not missing, f"docs/gitops.md's health table lacks {missing}"
