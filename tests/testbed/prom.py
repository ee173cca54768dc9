"""A real Prometheus (3.x, built by build.sh with its Kubernetes service discovery) for tests: own process on
loopback, generated config, 1 s scrapes."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import requests
import yaml

from .kube import PROVISION_HINT, binary_dirs
from .procs import LOOPBACK, Proc, free_port, wait_until


class Prometheus:
    """Session-wide Prometheus. add_target(), add_scrape_configs() and add_rules() rewrite the config and
    hot-reload it."""

    def __init__(self, work_dir: Path, log_dir: Path):
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.config_path = work_dir / "prometheus.yml"
        self.targets: dict[str, dict[str, Any]] = {}  # job -> {"targets": [...], "labels": {...}, path}
        self.rule_files: list[str] = []
        self.discovered: dict[str, dict[str, Any]] = {}  # job_name -> a scrape config with service discovery
        self.proc: Proc | None = None

    def start(self, timeout: float = 60.0) -> Prometheus:
        # Built by build.sh from Go modules, with kubernetes_sd_configs (Debian's package lacks it).
        binary = Path(binary_dirs().get("PROMETHEUS_BIN", "/nonexistent")) / "prometheus"
        if not binary.exists():
            raise RuntimeError(f"{binary} missing: {PROVISION_HINT}")
        self._write_config()
        self.proc = Proc(
            "prometheus",
            [
                str(binary),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d",
                "--log.level=info",
            ],
            self.log_dir,
        )
        proc = self.proc
        wait_until(
            lambda: proc.check_alive() and requests.get(f"{self.url}/-/ready", timeout=2).ok,
            timeout,
            f"Prometheus /-/ready at {self.url}",
        )
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    def add_target(
        self, job: str, host_port: str, labels: dict[str, str] | None = None, metrics_path: str = "/metrics"
    ) -> None:
        """Scrape http://host_port{metrics_path} as `job` (adds to the job's targets). Only this machine:
        loopback, or a pod on the real node's own bridge."""
        from .node import POD_SUBNET

        host = ipaddress.ip_address(host_port.rsplit(":", 1)[0])
        if not (host.is_loopback or host in ipaddress.ip_network(POD_SUBNET)):
            raise ValueError(f"test targets must be on 127.0.0.0/8 or {POD_SUBNET}, got {host_port}")
        entry = self.targets.setdefault(job, {"targets": [], "labels": {}, "metrics_path": metrics_path})
        if host_port not in entry["targets"]:
            entry["targets"].append(host_port)
        entry["labels"].update(labels or {})
        self.reload()

    def add_scrape_configs(self, configs: list[dict[str, Any]]) -> None:
        """Scrape configs with service discovery (e.g. testbed.monitors' kubernetes_sd_configs), each confined
        to this machine: a last relabel rule keeps only targets on loopback or the real node's bridge."""
        from .node import POD_SUBNET

        net = ipaddress.ip_network(POD_SUBNET)
        assert net.prefixlen == 24, POD_SUBNET  # the regex below spells the /24 out
        prefix = re.escape(str(net.network_address).rsplit(".", 1)[0] + ".")
        local = {
            "action": "keep",
            "source_labels": ["__address__"],
            "regex": rf"(127\.[0-9.]+|{prefix}[0-9]+):[0-9]+",
        }
        for c in configs:
            self.discovered[c["job_name"]] = {**c, "relabel_configs": [*c.get("relabel_configs", []), local]}
        self.reload()

    def add_rules(self, path: Path | str) -> None:
        """Load a rule file (recording/alerting rules); check it with `promtool check rules` first."""
        self.rule_files.append(str(Path(path).resolve()))
        self.reload()

    def reload(self) -> None:
        self._write_config()
        r = requests.post(f"{self.url}/-/reload", timeout=10)
        if r.status_code != 200:
            raise RuntimeError(f"Prometheus refused the new config ({r.status_code}): {r.text}")

    def _write_config(self) -> None:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": self.rule_files,
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": e["metrics_path"],
                    "static_configs": [{"targets": e["targets"], "labels": e["labels"]}],
                }
                for job, e in self.targets.items()
            ]
            + list(self.discovered.values()),
        }
        self.config_path.write_text(yaml.safe_dump(json.loads(json.dumps(config))))  # no YAML anchors

    def api(self, path: str, **params: Any) -> Any:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Instant query, polled until the result is non-empty (the first sample takes ~5 s to appear)."""
        return wait_until(
            lambda: self.api("query", query=promql)["result"],
            timeout,
            f"a non-empty result for PromQL {promql!r} from {self.url}",
            interval=0.5,
        )

    def value(self, promql: str, timeout: float = 30.0) -> float:
        """The value of a single-series instant query, as a float."""
        result = self.query(promql, timeout)
        if len(result) != 1:
            raise AssertionError(f"{promql!r} returned {len(result)} series, expected 1: {result}")
        return float(result[0]["value"][1])

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]
