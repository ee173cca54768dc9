"""Fixtures for the operator's e2e tests: the CRD on the real test bed, and the operator as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from testbed.procs import Proc, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
# SFTJOB_E2E_CRD: apply another CRD file (e.g. while debugging the generator); the committed one by default.
CRD = Path(os.environ.get("SFTJOB_E2E_CRD") or REPO / "crds" / "sft.tuning.dev_sftjobs.yaml")


@pytest.fixture(scope="session")
def sftjob_crd(kube: Any) -> Any:
    kube.apply_crd(CRD)
    return kube


class Operator:
    """`python -m sftjob_operator` watching one namespace of the test bed; killable, restartable."""

    def __init__(
        self,
        kube: Any,
        namespace: str,
        *extra: str,
        progress_interval: float = 1.0,
        trainer_metrics_port: int | None = None,
        name: str | None = None,
    ):
        self.kube = kube
        self.namespace = namespace
        self.extra = list(extra)
        self.progress_interval = progress_interval
        self.trainer_metrics_port = trainer_metrics_port or free_port()
        self.name = name or f"operator-{namespace}"
        self.proc: Proc | None = None
        self.starts = 0
        self.metrics_port = 0
        self.health_port = 0

    def start(self, timeout: float = 60) -> Operator:
        self.metrics_port, self.health_port = free_port(), free_port()
        self.starts += 1
        argv = [
            sys.executable,
            "-m",
            "sftjob_operator",
            "--kubeconfig",
            str(self.kube.kubeconfig),
            "--namespace",
            self.namespace,
            "--progress-interval",
            str(self.progress_interval),
            "--trainer-metrics-port",
            str(self.trainer_metrics_port),
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--health-address",
            "127.0.0.1",
            "--health-port",
            str(self.health_port),
            "--default-image",
            "registry.invalid/sftjob-trainer:test",
            *self.extra,
        ]
        if "--peering-name" not in self.extra:
            argv.append("--standalone")
        self.proc = Proc(f"{self.name}-{self.starts}", argv, self.kube.logs_dir)
        wait_until(lambda: self.proc.check_alive() and self.healthy(), timeout, f"{self.name} /healthz")
        return self

    def healthy(self) -> bool:
        return requests.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).status_code == 200

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()

    def stop(self, delete_sftjobs: bool = True) -> None:
        """Stop; first delete the namespace's SFTJobs while running, so that kopf takes its finalizer off
        (it puts one on every SFTJob: timers need it) and the namespace can go."""
        if self.proc is not None and self.proc.alive() and delete_sftjobs:
            self.kube.kubectl("delete", "sftjobs", "--all", "-n", self.namespace, "--wait=false", check=False)

            def none_left() -> bool:
                r = self.kube.kubectl("get", "sftjobs", "-n", self.namespace, "-o", "name", check=False)
                return r.returncode == 0 and not r.stdout.strip()

            # best effort: a namespace left Terminating is harmless in the throwaway test bed
            with contextlib.suppress(TimeoutError):
                wait_until(none_left, 30, "SFTJobs deleted", interval=0.5)
        if self.proc is not None:
            self.proc.stop()

    def log(self) -> str:
        return self.proc.tail(200) if self.proc else ""


@pytest.fixture
def operator(sftjob_crd: Any, namespace: str) -> Iterator[Operator]:
    op = Operator(sftjob_crd, namespace).start()
    yield op
    op.stop()


@pytest.fixture
def start_operator(sftjob_crd: Any, namespace: str) -> Iterator[Callable[..., Operator]]:
    started: list[Operator] = []

    def start(*extra: str, **kw: Any) -> Operator:
        op = Operator(sftjob_crd, namespace, *extra, **kw).start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


# ---- helpers used by the tests ------------------------------------------------------------------------------


def sftjob(
    name: str, delay: str = "1s", exit_code: int | None = None, gpus: int = 1, **spec: Any
) -> dict[str, Any]:
    """A small SFTJob whose KWOK pods run `delay` then exit with `exit_code` (annotations)."""
    annotations = {"kwok.sftjob.dev/delay": delay}
    if exit_code is not None:
        annotations["kwok.sftjob.dev/exit-code"] = str(exit_code)
    body: dict[str, Any] = {
        "model": {"uri": "s3://models/smollm2-135m-instruct"},
        "dataset": {"train": ["s3://datasets/alpaca-sample.jsonl"]},
        "output": {"uri": "s3://artifacts/sft", "endpoint": "http://127.0.0.1:8333", "pathStyle": True},
        "resources": {"gpusPerNode": gpus, "podAnnotations": annotations},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {
        "apiVersion": "sft.tuning.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": name},
        "spec": body,
    }


def apply(kube: Any, namespace: str, *objs: dict[str, Any]) -> None:
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}),
    )


def get(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    r = kube.kubectl("get", "sftjob", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def status(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(get(kube, namespace, name).get("status") or {})


def condition(st: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), {})


def wait_phase(
    kube: Any,
    namespace: str,
    name: str,
    phases: str | tuple[str, ...],
    timeout: float = 90,
    op: Operator | None = None,
) -> dict[str, Any]:
    wanted = (phases,) if isinstance(phases, str) else phases
    seen: list[str] = []

    def check() -> dict[str, Any] | None:
        st = status(kube, namespace, name)
        if st.get("phase") and (not seen or seen[-1] != st["phase"]):
            seen.append(st["phase"])
        return st if st.get("phase") in wanted else None

    try:
        return wait_until(check, timeout, f"{namespace}/{name} phase in {wanted}", interval=0.3)
    except TimeoutError as e:
        detail = json.dumps(status(kube, namespace, name), indent=1)
        raise AssertionError(
            f"{e}\nphases seen: {seen}\nstatus: {detail}\noperator log:\n{op.log() if op else ''}"
        ) from None


PEERING_CRDS = REPO / "helm" / "sftjob-operator" / "crds" / "kopf.dev_peerings.yaml"


def create_peering(kube: Any, namespace: str, name: str = "sftjob-operator") -> None:
    """kopf's peering CRDs (from the chart) and a namespaced KopfPeering for replicas started with --peering."""
    kube.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name}}
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(peering))


def jobs(kube: Any, namespace: str) -> list[dict[str, Any]]:
    return list(kube.get_json("jobs", "-n", namespace, "-l", "sft.tuning.dev/job-name")["items"])


def pods(kube: Any, namespace: str, selector: str = "sft.tuning.dev/job-name") -> list[dict[str, Any]]:
    return list(kube.get_json("pods", "-n", namespace, "-l", selector)["items"])


def events(kube: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    items = kube.get_json(
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=SFTJob,involvedObject.name={name}",
    )["items"]
    # Timestamps have one-second resolution; the resourceVersion (etcd revision) orders creations exactly.
    return sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))


def wait_event(
    kube: Any, namespace: str, name: str, reason: str, timeout: float = 30
) -> list[dict[str, Any]]:
    """The SFTJob's Events once one has `reason`. The operator posts an Event after the status write it
    belongs to, so a test that just saw the status may list the Events a moment too early."""

    def with_reason() -> list[dict[str, Any]] | None:
        evs = events(kube, namespace, name)
        return evs if any(e["reason"] == reason for e in evs) else None

    return wait_until(with_reason, timeout, f"an Event {reason} of {namespace}/{name}")


def timed(what: str) -> Callable[[], float]:
    t0 = time.monotonic()

    def done() -> float:
        dt = time.monotonic() - t0
        print(f"{what}: {dt:.1f}s")
        return dt

    return done
