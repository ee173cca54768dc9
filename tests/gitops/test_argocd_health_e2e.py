"""The Argo CD health check (helm/sftjob-operator/argocd/health.lua) on statuses captured from real runs of
the operator on the test bed: every phase and every failure reason, evaluated in a real Lua 5.1.

A watch on the SFTJobs records every distinct (phase, reason, Stuck) state the operator writes while the
runs below go through success, each failure, suspension, a Kueue queue and a stuck pod. Each recorded
object is evaluated by the Lua and must give the health docs/gitops.md promises for that state.
SFTJOB_WRITE_GITOPS_CAPTURES=1 rewrites tests/gitops/captured_statuses.json, which the fast test
(test_argocd_health.py) replays without a test bed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from typing import Any

import pytest
from sftjob_operator_e2e_fixtures import Operator, apply, condition, pods, sftjob, status, wait_phase
from testbed.helm import CHART, helm
from testbed.procs import wait_until

from gitops.argocd_lua import ARGOCD_CM_KEY, HEALTH_LUA, health
from gitops.health_table import CAPTURES, DOC, REQUIRED_STATES, covered, documented_health, state_key, trim
from sftjob_api import GROUP, PLURAL, VERSION

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class Recorder:
    """Every state of the namespace's SFTJobs, from a watch (nothing the operator writes is missed)."""

    def __init__(self, kube: Any, namespace: str):
        from kubernetes import client, watch

        self.api = client.CustomObjectsApi(kube.api_client())
        self.namespace = namespace
        self.watch = watch.Watch()
        self.states: dict[tuple[str, str, str, bool], dict[str, Any]] = {}
        self.stop = threading.Event()
        # Watch from a list's resourceVersion taken now: every later write is delivered, creations included
        # (a watch that starts after them would see them already with a status).
        listed = self.api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        self.thread = threading.Thread(
            target=self._run, args=(listed["metadata"]["resourceVersion"],), daemon=True
        )
        self.thread.start()

    def _run(self, rv: str | None) -> None:
        while not self.stop.is_set():
            kw = {"resource_version": rv} if rv else {}
            try:
                for ev in self.watch.stream(
                    self.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    timeout_seconds=5,
                    **kw,
                ):
                    obj = ev["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    self.states.setdefault(state_key(obj), trim(obj))
                    if self.stop.is_set():
                        break
            except Exception:  # a watch expired (410) or the namespace is going: list again
                rv = None
                time.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        self.watch.stop()
        self.thread.join(10)


def _annotate_when_running(
    kube: Any, namespace: str, name: str, stage: str, code: int, before: Any = None
) -> None:
    """Make the `stage` pod of `name` exit with `code` (KWOK reads the annotation; tests/testbed);
    `before()` runs once the pod is Running, just before."""
    selector = f"sft.tuning.dev/job-name={name},sft.tuning.dev/stage={stage}"
    pod = wait_until(
        lambda: next(
            (p for p in pods(kube, namespace, selector) if p["status"].get("phase") == "Running"), None
        ),
        90,
        f"{name} {stage} pod Running",
        interval=0.2,
    )
    if before is not None:
        before()
    kube.kubectl(
        "annotate",
        "pod",
        pod["metadata"]["name"],
        "-n",
        namespace,
        f"kwok.sftjob.dev/exit-code={code}",
        "kwok.sftjob.dev/delay=0s",
        "--overwrite",
    )


def _admit_when_queued(kube: Any, namespace: str, name: str, stage: str) -> None:
    """Once the SFTJob says its `stage` Job waits for Kueue (reason Queued), unsuspend that Job, as Kueue
    does on admission."""
    wait_until(
        lambda: (
            status(kube, namespace, name).get("reason") == "Queued"
            and kube.kubectl("get", "job", f"{name}-{stage}", "-n", namespace, check=False).returncode == 0
        ),
        90,
        f"{name} {stage} Job queued",
        interval=0.3,
    )
    kube.kubectl(
        "patch", "job", f"{name}-{stage}", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )


def _stuck_while_training(kube: Any, namespace: str) -> None:
    """A replacement trainer pod that cannot start: every node is cordoned when the first pod fails, so the
    run is Training and Stuck (Unschedulable) until the nodes come back; then it finishes."""
    apply(kube, namespace, sftjob("restuck", delay="8s", runPolicy={"stuckPendingTimeoutSeconds": 10}))
    nodes = [n["metadata"]["name"] for n in kube.get_json("nodes")["items"]]
    try:
        _annotate_when_running(
            kube, namespace, "restuck", "train", 1, before=lambda: [kube.kubectl("cordon", n) for n in nodes]
        )
        wait_until(
            lambda: condition(status(kube, namespace, "restuck"), "Stuck").get("status") == "True",
            60,
            "restuck Stuck while Training",
        )
    finally:
        for n in nodes:
            kube.kubectl("uncordon", n)
    wait_phase(kube, namespace, "restuck", "Succeeded", 90)


def _runs() -> list[dict[str, Any]]:
    gated = {
        "kwok.sftjob.dev/delay": "1s",
        "kwok.sftjob.dev/message": json.dumps({"evalResults": {"evalLoss": 1.25}}),
    }
    queued = sftjob("queued", merge={"enabled": False})
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    admitted = sftjob("admitted")  # queued too; the test admits each stage's Job the way Kueue does
    admitted["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    local = sftjob("invalid")
    local["spec"]["output"] = {"uri": "./runs"}  # valid for `sftjob run`, refused by the operator
    return [
        sftjob("happy", delay="3s"),
        sftjob("perm", exit_code=2, runPolicy={"backoffLimit": 3}),
        sftjob("backoff", exit_code=1, runPolicy={"backoffLimit": 1}),
        sftjob("deadline", delay="60s", runPolicy={"activeDeadlineSeconds": 3}),
        sftjob(
            "gated",
            resources={"gpusPerNode": 1, "podAnnotations": gated},
            eval={"gates": {"maxEvalLoss": 1.0}, "metrics": ["loss"]},
        ),
        sftjob("evalfail", delay="6s"),  # time to find the eval/merge pod Running and make it fail
        sftjob("mergefail", delay="6s"),
        sftjob(
            "stuck",
            gpus=16,
            training={"microBatchSize": 1, "globalBatchSize": 16},
            runPolicy={"stuckPendingTimeoutSeconds": 10, "failWhenStuckSeconds": 10},
        ),
        sftjob("paused", suspend=True),
        queued,
        admitted,
        local,
    ]


FINAL = {
    "happy": ("Succeeded", "Succeeded"),
    "perm": ("Failed", "TrainingFailed"),
    "backoff": ("Failed", "BackoffLimitExceeded"),
    "deadline": ("Failed", "DeadlineExceeded"),
    "gated": ("Failed", "EvalGateFailed"),
    "evalfail": ("Failed", "EvalFailed"),
    "mergefail": ("Failed", "MergeFailed"),
    "stuck": ("Failed", "Stuck"),
    "paused": ("Suspended", "Suspended"),
    "queued": ("Pending", "Queued"),
    "admitted": ("Succeeded", "Succeeded"),
    "invalid": ("Failed", "InvalidSpec"),
}


def test_health_of_every_phase_and_failure_reason_captured_from_real_runs(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube = sftjob_crd
    recorder = Recorder(kube, namespace)
    try:
        apply(kube, namespace, *_runs())
        _annotate_when_running(kube, namespace, "evalfail", "eval", 2)
        _annotate_when_running(kube, namespace, "mergefail", "merge", 2)
        for stage in ("train", "eval", "merge"):
            _admit_when_queued(kube, namespace, "admitted", stage)

        def settled() -> bool:
            return all(
                (status(kube, namespace, n).get("phase"), status(kube, namespace, n).get("reason")) == want
                for n, want in FINAL.items()
            )

        try:
            wait_until(settled, 150, "every run in its final state", interval=1.0)
        except TimeoutError:
            now = {
                n: (status(kube, namespace, n).get("phase"), status(kube, namespace, n).get("reason"))
                for n in FINAL
            }
            raise AssertionError(f"final states: {now}\noperator log:\n{operator.log()}") from None
        _stuck_while_training(kube, namespace)
        time.sleep(1)  # the watch delivers the last writes
    finally:
        recorder.close()

    captured = dict(recorder.states)
    seen = {key[1:] for key in captured}
    missing = [k for k in REQUIRED_STATES if not covered(seen, k)]
    assert not missing, f"states never seen: {missing}; seen: {sorted(captured)}"

    results = []
    for (name, phase, reason, stuck), obj in sorted(captured.items()):
        got = health(obj)
        want = documented_health(phase, reason, stuck)
        assert got["status"] == want, (name, phase, reason, stuck, got, obj["status"])
        results.append((name, phase, reason, stuck, got["status"], got["message"]))
    for row in results:
        print(" | ".join(str(x) for x in row))

    if os.environ.get("SFTJOB_WRITE_GITOPS_CAPTURES") == "1":
        objs = sorted(captured.values(), key=lambda o: state_key(o))
        CAPTURES.write_text(json.dumps(objs, indent=1, sort_keys=True) + "\n")
    # The committed captures (replayed by the fast test) cover every state a real run goes through.
    committed = {state_key(o)[1:] for o in json.loads(CAPTURES.read_text())}
    stale = [k for k in REQUIRED_STATES if not covered(committed, k)]
    assert not stale, f"{CAPTURES.name} lacks {stale}: rerun with SFTJOB_WRITE_GITOPS_CAPTURES=1"


def test_the_documented_argocd_cm_install_merges_the_check(sftjob_crd: Any, namespace: str) -> None:
    """docs/gitops.md's commands on the real kube-apiserver: the chart's ConfigMap, merged into an existing
    argocd-cm (its other keys kept); the Lua read back from argocd-cm gives the documented health."""
    kube = sftjob_crd
    argocd_ns = kube.create_namespace("argocd")
    try:
        kube.kubectl(
            "create", "configmap", "argocd-cm", "-n", argocd_ns, "--from-literal=url=https://argocd.example"
        )
        rendered = helm(
            "template",
            "sftjob",
            str(CHART),
            "-n",
            namespace,
            "--set",
            "argocd.healthCheck.enabled=true",
            "--show-only",
            "templates/argocd-health.yaml",
            "--kube-version",
            "1.34.0",
        ).stdout
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=rendered)
        command = re.search(r"(kubectl -n argocd patch configmap argocd-cm .*?\)\}\")", DOC.read_text(), re.S)
        assert command, "docs/gitops.md lost its argocd-cm patch command"
        script = (
            command[1]
            .replace("-n argocd ", f"-n {argocd_ns} ")
            .replace("-n sftjob-system ", f"-n {namespace} ")
        )
        env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        data = kube.get_json("configmap", "argocd-cm", "-n", argocd_ns)["data"]
        assert data["url"] == "https://argocd.example"
        assert data[ARGOCD_CM_KEY].strip() == HEALTH_LUA.read_text().strip()
        for obj in json.loads(CAPTURES.read_text()):
            _, phase, reason, is_stuck = state_key(obj)
            assert health(obj, data[ARGOCD_CM_KEY])["status"] == documented_health(phase, reason, is_stuck)
    finally:
        kube.delete_namespace(argocd_ns)
