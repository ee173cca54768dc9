"""Two operator replicas with kopf peering: only the higher-priority one acts, the other pauses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import apply, jobs, sftjob, wait_phase
from testbed.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PEERING_CRDS = (
    Path(__file__).resolve().parents[2] / "helm" / "sftjob-operator" / "crds" / "kopf.dev_peerings.yaml"
)


def test_second_replica_pauses_while_the_first_is_active(
    sftjob_crd: Any, namespace: str, start_operator: Any
) -> None:
    kube = sftjob_crd
    kube.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "sftjob-operator"}}
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(peering))

    peer = ("--peering-name", "sftjob-operator")
    active = start_operator(*peer, "--priority", "100", name=f"active-{namespace}")
    standby = start_operator(*peer, "--priority", "10", name=f"standby-{namespace}")
    wait_until(lambda: "Pausing operations in favour of" in standby.log(), 60, "the standby replica pausing")

    apply(kube, namespace, sftjob("peered", eval={"enabled": False}, merge={"enabled": False}))
    st = wait_phase(kube, namespace, "peered", ("Succeeded", "Failed"), 90, active)
    assert st["phase"] == "Succeeded", st
    assert [j["metadata"]["name"] for j in jobs(kube, namespace)] == ["peered-train"]
    assert "created train Job" in active.log()
    assert "created train Job" not in standby.log()  # paused: it never acted
    assert "Pausing operations" not in active.log()
