"""Bounded specs and a slim index (issue 25, item 4): the API server refuses an affinity over its caps naming
the field, and 20 SFTJobs with the largest affinity and tolerations it accepts keep the operator's peak RSS
well inside the chart's memory limit (its index and kopf's diff base keep a digest of those fields)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Operator, sftjob, status
from largest_spec import largest
from testbed.procs import wait_until

from sftjob_api import SpecError, parse_spec
from sftjob_api.scheduling import MAX_TERMS, MAX_TOLERATIONS, Affinity, Toleration

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COUNT = 20
TERMS = (
    "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
)


def chart_memory_limit_kib() -> int:
    values = yaml.safe_load((REPO / "helm" / "sftjob-operator" / "values.yaml").read_text())
    limit = values["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * 1024


def largest_resources() -> dict[str, Any]:
    return {"affinity": largest(Affinity), "tolerations": [largest(Toleration, str(i)) for i in range(64)]}


def over_cap() -> dict[str, Any]:
    """The largest affinity plus one node selector term."""
    affinity = largest(Affinity)
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    terms.append(terms[0])
    assert len(terms) == MAX_TERMS + 1
    return affinity


def vm_hwm_kib(op: Operator) -> int:
    assert op.proc is not None
    for line in Path(f"/proc/{op.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_pydantic_refuses_an_affinity_over_its_caps_naming_the_field() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({**sftjob("x")["spec"], "resources": {"affinity": over_cap()}})
    assert any(m.startswith(TERMS + ": List should have at most") for m in e.value.errors), e.value.errors
    assert len(largest_resources()["tolerations"]) == MAX_TOLERATIONS


@pytest.mark.timeout(60)
def test_api_server_refuses_an_affinity_over_its_caps_naming_the_field(
    sftjob_crd: Any, namespace: str
) -> None:
    job = sftjob("over")
    job["spec"]["resources"] = {"affinity": over_cap()}
    r = sftjob_crd.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job), check=False)
    assert r.returncode != 0, "an affinity over the caps was accepted"
    assert TERMS in r.stderr and "must have at most 4 items" in r.stderr, r.stderr[-2000:]
    job["spec"]["resources"] = largest_resources()
    sftjob_crd.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job))  # the largest fits


@pytest.mark.timeout(240)
def test_twenty_largest_affinities_keep_the_operator_within_its_memory_limit(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube = sftjob_crd
    names = [f"big-{i}" for i in range(COUNT)]
    jobs = [{**sftjob(n), "spec": {**sftjob(n)["spec"], "resources": largest_resources()}} for n in names]
    t0 = time.monotonic()
    # create, not client-side apply (its last-applied annotation would exceed 256 KiB); 5 per request (~1.5 MB)
    for i in range(0, COUNT, 5):
        items = json.dumps({"apiVersion": "v1", "kind": "List", "items": jobs[i : i + 5]})
        kube.kubectl("create", "-n", namespace, "-f", "-", input=items)
    print(f"created in {time.monotonic() - t0:.1f}s")
    size = len(json.dumps(largest_resources()))

    # The generated keys and operators are not valid core/v1 values, so each train Job is refused and the
    # SFTJob fails naming spec.resources.affinity: the Job was rendered from the full spec read at its create.
    def all_failed() -> bool:
        path = "jsonpath={range .items[*]}{.status.reason}{'\\n'}{end}"
        reasons = kube.kubectl("get", "sftjobs", "-n", namespace, "-o", path).stdout.split()
        return reasons == ["InvalidSpec"] * COUNT

    wait_until(all_failed, 60, "every SFTJob Failed/InvalidSpec", interval=1.0)
    print(f"all Failed/InvalidSpec after {time.monotonic() - t0:.1f}s")
    message = status(kube, namespace, names[0]).get("message") or ""
    assert "spec.resources." in message, message
    time.sleep(2)  # a few timer ticks after the last transition
    hwm, limit = vm_hwm_kib(operator), chart_memory_limit_kib()
    print(
        f"{COUNT} SFTJobs x {size / 1024:.0f} KiB of affinity+tolerations: operator VmHWM {hwm / 1024:.0f} MiB"
    )
    assert hwm <= 0.6 * limit, f"peak RSS {hwm} KiB > 60% of the chart's {limit} KiB limit"
