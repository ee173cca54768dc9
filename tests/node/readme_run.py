"""The README's SmolLM2 task as one SFTJob on the real node, run once for tests/node/test_real_node_e2e.py,
watched the way a user and a cluster's Prometheus watch it; the tests then assert on what was recorded.

While it runs: `kubectl get sft` every second; Prometheus discovers the pods from the apiserver through the
chart's PodMonitor/ServiceMonitor (testbed/monitors.py) and every dashboard panel is queried while the
trainer pods are up; a second SFTJob that no node can hold (`cpu: 4`) shows the Unschedulable condition,
then fails as Stuck, and the shipped alert SFTJobFailed fires for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from testbed.monitors import chart_monitors, prometheus_identity, scrape_configs
from testbed.node import NODE_SELECTOR, TOLERATIONS

from sftjob_operator.dashboards import all_panels

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sftjob-smollm2.yaml"
DATA = REPO / "examples" / "data"
RULES = REPO / "helm" / "sftjob-operator" / "rules" / "sftjob-alerts.yaml"
NAME = "smollm2-contacts"  # the example's own name
DOOMED = "needs-four-cores"
# the stages in order (Pending may come between two: the next stage's Job is being created)
PHASES = ("Curating", "Training", "Evaluating", "Merging", "Succeeded")


def printed_rows(table: str) -> list[dict[str, str]]:
    """`kubectl get` output as dicts, cut at the header's column starts (cells may be empty)."""
    header, *rows = table.splitlines()
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    cut = [*starts[1:], None]
    return [{n: row[a:b].strip() for n, a, b in zip(names, starts, cut, strict=True)} for row in rows]


def json_lines(text: str) -> list[dict[str, Any]]:
    """The trainer's JSON log events in a pod's log."""
    return [json.loads(x) for x in text.splitlines() if x.startswith("{") and '"event"' in x]


def readme_sftjob(prefix: str, endpoint: str, secret: str) -> dict[str, Any]:
    """examples/sftjob-smollm2.yaml as a cluster user would change it: data and output in S3, two pods
    (ZeRO-3 across them) sized to the node, curation on, eval on 16 held-out rows (for time)."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["dataset"] |= {
        "train": [f"{prefix}/data/contacts-train.jsonl"],
        "eval": [f"{prefix}/data/contacts-eval.jsonl"],
        "curation": {"nearDuplicates": {}},
    }
    spec["resources"] = {
        "nodes": 2,
        "gpusPerNode": 0,
        "cpu": "900m",  # 2 ranks + the operator's 100m fill the node's 2 cores
        "memory": "6Gi",  # rank 0 was OOM-killed at 4Gi (ZeRO-3 gathers on top of the loaded model)
        "shmSize": "512Mi",
        "deepspeed": {"zeroStage": 3},
        "nodeSelector": NODE_SELECTOR,
        "tolerations": TOLERATIONS,
    }
    spec["output"] |= {
        "uri": f"{prefix}/runs",
        "endpoint": endpoint,
        "pathStyle": True,
        "region": "us-east-1",
        "credentialsSecret": {"name": secret},
    }
    spec["eval"]["maxSamples"] = 16
    return doc


def doomed_sftjob(prefix: str, endpoint: str, secret: str) -> dict[str, Any]:
    """An SFTJob whose pods ask for more CPU than the node has: Unschedulable at once, Failed/Stuck soon."""
    doc = readme_sftjob(prefix, endpoint, secret)
    doc["metadata"]["name"] = DOOMED
    doc["spec"]["dataset"].pop("curation")
    doc["spec"]["resources"] |= {"nodes": 1, "cpu": "4", "deepspeed": {"zeroStage": 0}}
    doc["spec"]["runPolicy"] = {"stuckPendingTimeoutSeconds": 10, "failWhenStuckSeconds": 10}
    return doc


def upload_data(client: Any, bucket: str) -> None:
    """The example's data; one training row twice, so curation drops one (the Samples-dropped panel)."""
    train = (DATA / "contacts-train.jsonl").read_text()
    train += train.splitlines()[0] + "\n"
    client.put_object(Bucket=bucket, Key="data/contacts-train.jsonl", Body=train.encode())
    client.upload_file(str(DATA / "contacts-eval.jsonl"), bucket, "data/contacts-eval.jsonl")


def promql(expr: str, namespace: str, name: str) -> str:
    return expr.replace("$namespace", namespace).replace("$sftjob", name)


@dataclass
class ReadmeRun:
    namespace: str
    status: dict[str, Any] = field(default_factory=dict)  # the final status
    first_seen: dict[str, float] = field(default_factory=dict)  # phase -> seconds after apply
    rows: list[dict[str, str]] = field(default_factory=list)  # every `kubectl get sft` row read
    trainer_targets: list[dict[str, Any]] = field(default_factory=list)  # `up` of the discovered trainer pods
    operator_up: list[dict[str, Any]] = field(default_factory=list)  # `up` of the discovered operator
    panels_without_data: list[str] = field(default_factory=list)
    panels_checked: int = 0
    rules: list[dict[str, Any]] = field(default_factory=list)  # /api/v1/rules, read during training
    fired: list[dict[str, Any]] = field(default_factory=list)  # the alert made to fire
    doomed_early: dict[str, Any] = field(default_factory=dict)  # its status when Unschedulable was first seen
    doomed_final: dict[str, Any] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)  # every pod of the run, after it
    logs: dict[str, str] = field(default_factory=dict)  # pod name -> log

    def times(self) -> dict[str, float]:
        """Wall seconds per phase (first seen to the next phase first seen)."""
        seen = sorted(self.first_seen.items(), key=lambda kv: kv[1])
        return {a: round(tb - ta, 1) for (a, ta), (_, tb) in pairwise(seen)}


def _condition(st: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), {})


def _maybe(prom: Any, promql: str) -> list[dict[str, Any]]:
    """The query's result, or [] when it stays empty (the test then says what was missing)."""
    try:
        return list(prom.query(promql, timeout=30))
    except TimeoutError:
        return []


def _query_panels(prom: Any, run: ReadmeRun, trainer: bool, timeout: float) -> None:
    for panel in all_panels():
        if panel.needs or panel.only or ("sft_" in panel.expr.replace("sftjob_", "")) != trainer:
            continue  # dcgm-exporter panels: GPUs are simulated here; the README task does not align (DPO)
        expr = promql(panel.expr, run.namespace, NAME)
        run.panels_checked += 1
        try:
            prom.query(expr, timeout=timeout)
        except TimeoutError:
            run.panels_without_data.append(f"{panel.title}: {expr}")


def run_readme_task(
    kube: Any,
    prom: Any,
    namespace: str,
    release: str,
    prefix: str,
    endpoint: str,
    secret: str,
    timeout: float,
) -> ReadmeRun:
    run = ReadmeRun(namespace)
    prom.add_rules(RULES)
    # as a user would set them for a short run (the chart's defaults: 15 s and 30 s)
    values = {
        "watch": {"namespaces": [namespace]},
        "podMonitor": {"interval": "5s"},
        "serviceMonitor": {"interval": "5s"},
    }
    monitors = chart_monitors(release, namespace, values)
    prom.add_scrape_configs(scrape_configs(monitors, prometheus_identity(kube, namespace)))

    def status(name: str) -> dict[str, Any]:
        return kube.get_json("sftjob", name, "-n", namespace).get("status") or {}

    def apply(doc: dict[str, Any]) -> None:
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

    apply(readme_sftjob(prefix, endpoint, secret))
    t0 = time.monotonic()
    doomed_applied = trainer_checked = False
    applied_at = 0.0
    while True:
        now = time.monotonic() - t0
        if now > timeout:
            raise AssertionError(
                f"{NAME} did not finish in {timeout} s: {json.dumps(status(NAME), indent=1)}"
            )
        run.rows += printed_rows(kube.kubectl("get", "sft", NAME, "-n", namespace).stdout)
        st = status(NAME)
        phase = st.get("phase")
        if phase:
            run.first_seen.setdefault(phase, round(now, 1))
        if phase in ("Succeeded", "Failed"):
            run.status = st
            break
        step = (st.get("progress") or {}).get("step") or 0
        if phase == "Training" and not doomed_applied and (st.get("progress") or {}).get("loss") is not None:
            apply(
                doomed_sftjob(prefix, endpoint, secret)
            )  # after both ranks are placed: it must not take their CPU
            doomed_applied, applied_at = True, now
        if doomed_applied and not run.doomed_early:
            early = status(DOOMED)
            if _condition(early, "Unschedulable").get("status") == "True":
                run.doomed_early = early
        # (the trainer checks may take seconds: first see the second SFTJob's condition, before its Stuck)
        said = bool(run.doomed_early) or (doomed_applied and now - applied_at > 30)
        if phase == "Training" and step >= 1 and not trainer_checked and said:
            # while both ranks run: their discovered targets, every trainer panel, the rules' evaluation
            sel = f'up{{namespace="{namespace}", job="{namespace}/{release}-sftjob-operator-trainers"}}'
            run.trainer_targets = _maybe(prom, sel)
            _query_panels(prom, run, trainer=True, timeout=20)
            run.rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            trainer_checked = True
        time.sleep(1.0)
    run.first_seen.setdefault("end", round(time.monotonic() - t0, 1))
    run.rows += printed_rows(kube.kubectl("get", "sft", NAME, "-n", namespace).stdout)  # the finished run

    # after the run: the operator's panels (eval loss, phase timeline, ...) and the alert made to fire
    run.operator_up = _maybe(prom, f'up{{job="{release}-sftjob-operator-metrics"}} == 1')
    _query_panels(prom, run, trainer=False, timeout=60)
    if doomed_applied:
        deadline = time.monotonic() + 120
        while not run.fired and time.monotonic() < deadline:
            run.fired = [
                a
                for a in prom.alerts()
                if a["labels"].get("alertname") == "SFTJobFailed"
                and a["labels"].get("sftjob") == DOOMED
                and a["state"] == "firing"
            ]
            time.sleep(1.0)
        run.doomed_final = status(DOOMED)
    run.pods = kube.get_json("pods", "-n", namespace, "-l", f"sft.tuning.dev/job-name={NAME}")["items"]
    for pod in run.pods:
        name = pod["metadata"]["name"]
        run.logs[name] = kube.kubectl("logs", "-n", namespace, name, check=False).stdout
    return run
