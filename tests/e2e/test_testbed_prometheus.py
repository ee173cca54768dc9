"""Smoke tests proving the prometheus fixture is a real Prometheus scraping real HTTP endpoints."""

from __future__ import annotations

import ipaddress
import json
import secrets

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from testbed.monitors import chart_monitors, prometheus_identity, scrape_configs
from testbed.procs import LOOPBACK, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def exporter():
    """A prometheus_client exporter on loopback with a gauge and a counter; yields (host:port, metrics)."""
    registry = CollectorRegistry()
    loss = Gauge("sft_train_loss", "training loss", ["rank"], registry=registry)
    tokens = Counter("sft_train_tokens", "tokens seen", ["rank"], registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr=LOOPBACK, registry=registry)
    yield f"{LOOPBACK}:{port}", loss, tokens
    server.shutdown()
    thread.join(5)


def test_scrapes_a_test_exporter_and_answers_a_query(prometheus, exporter):
    host_port, loss, tokens = exporter
    job = "smoke-" + secrets.token_hex(3)
    loss.labels(rank="0").set(2.5)
    tokens.labels(rank="0").inc(1000)
    prometheus.add_target(job, host_port, labels={"namespace": "smoke"})

    assert prometheus.value(f'up{{job="{job}"}}') == 1.0
    assert prometheus.value(f'sft_train_loss{{job="{job}",rank="0",namespace="smoke"}}') == 2.5
    # A changed value shows up in a later scrape: this is a live scrape loop, not a static file.
    loss.labels(rank="0").set(1.25)
    prometheus.query(f'sft_train_loss{{job="{job}"}} == 1.25', timeout=15)
    assert prometheus.value(f'sft_train_tokens_total{{job="{job}"}}') == 1000.0


def test_a_dead_target_is_reported_down(prometheus):
    job = "dead-" + secrets.token_hex(3)
    prometheus.add_target(job, f"{LOOPBACK}:{free_port()}")  # nothing listens there
    assert prometheus.value(f'up{{job="{job}"}}') == 0.0


def test_non_loopback_targets_are_refused(prometheus):
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        prometheus.add_target("nope", "10.1.2.3:9090")


def test_query_times_out_with_a_clear_message(prometheus):
    with pytest.raises(TimeoutError, match="no_such_metric"):
        prometheus.query("no_such_metric_anywhere", timeout=2)


def test_the_charts_pod_monitor_finds_a_trainer_pod_through_the_apiserver(kube, namespace, prometheus):
    """No static target: Prometheus discovers the pod from the apiserver (kubernetes_sd_configs, as a
    ServiceAccount with only the Prometheus Operator's RBAC) and keeps it by the chart's PodMonitor's
    relabelling (label sft.tuning.dev/job-name, port `metrics`); a pod without the label is not scraped.
    The exporter is real and serves on the loopback address KWOK gave the pod."""
    port = free_port()

    def pod(name, labels):
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "containers": [
                    {
                        "name": "trainer",
                        "image": "registry.invalid/trainer:test",
                        "ports": [{"name": "metrics", "containerPort": port}],
                    }
                ]
            },
        }

    kube.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(pod("rank0", {"sft.tuning.dev/job-name": "r"}))
    )
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod("other", {"app": "other"})))
    kube.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/rank0", "pod/other", "--timeout=30s")
    pod_ip = kube.get_json("pod/rank0", "-n", namespace)["status"]["podIP"]
    other_ip = kube.get_json("pod/other", "-n", namespace)["status"]["podIP"]
    assert ipaddress.ip_address(pod_ip).is_loopback

    registry = CollectorRegistry()
    Gauge("sft_train_step", "step", registry=registry).set(7)
    servers = [start_http_server(port, addr=ip, registry=registry) for ip in (pod_ip, other_ip)]
    try:
        monitors = chart_monitors("sftjob", namespace, {"watch": {"namespaces": [namespace]}})
        configs = scrape_configs(monitors, prometheus_identity(kube, namespace))
        prometheus.add_scrape_configs(configs)
        job = f"{namespace}/sftjob-sftjob-operator-trainers"  # the Prometheus Operator's job label
        found = prometheus.query(f'sft_train_step{{job="{job}"}}', timeout=60)
        assert [r["metric"]["pod"] for r in found] == ["rank0"], found
        assert found[0]["metric"]["instance"] == f"{pod_ip}:{port}" and found[0]["value"][1] == "7"
        assert found[0]["metric"]["namespace"] == namespace and found[0]["metric"]["endpoint"] == "metrics"
        targets = prometheus.api("targets")["activeTargets"]
        assert not [t for t in targets if t["labels"].get("pod") == "other"], targets
    finally:
        for server, thread in servers:
            server.shutdown()
            thread.join(5)
