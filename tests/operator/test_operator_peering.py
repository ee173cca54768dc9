"""Two operator replicas with kopf peering: only the higher-priority one acts, the other pauses."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import apply, create_peering, jobs, sftjob, wait_phase
from testbed.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_second_replica_pauses_while_the_first_is_active(
    sftjob_crd: Any, namespace: str, start_operator: Any
) -> None:
    kube = sftjob_crd
    create_peering(kube, namespace)

    peer = ("--peering-name", "sftjob-operator")
    active = start_operator(*peer, "--priority", "100", name=f"active-{namespace}")
    standby = start_operator(*peer, "--priority", "10", name=f"standby-{namespace}")

    def peers() -> dict[str, Any]:
        obj = kube.get_json("kopfpeering", "sftjob-operator", "-n", namespace)
        return {k: v for k, v in (obj.get("status") or {}).items() if isinstance(v, dict)}

    wait_until(
        lambda: sorted(p.get("priority") for p in peers().values()) == [10, 100], 60, "both peers seen"
    )

    apply(kube, namespace, sftjob("peered", eval={"enabled": False}, merge={"enabled": False}))
    st = wait_phase(kube, namespace, "peered", ("Succeeded", "Failed"), 90, active)
    assert st["phase"] == "Succeeded", st
    assert [j["metadata"]["name"] for j in jobs(kube, namespace)] == ["peered-train"]
    assert "created train Job" in active.log()
    assert "created train Job" not in standby.log()  # kopf keeps the lower priority replica paused

    # Fail-over: the active replica leaves (a clean exit removes it from the peering object at once).
    active.stop(delete_sftjobs=False)
    wait_until(lambda: "Resuming operations" in standby.log(), 60, "the standby replica resuming")
    apply(kube, namespace, sftjob("after", eval={"enabled": False}, merge={"enabled": False}))
    st = wait_phase(kube, namespace, "after", ("Succeeded", "Failed"), 90, standby)
    assert st["phase"] == "Succeeded", st
    assert "created train Job" in standby.log()
