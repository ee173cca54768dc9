"""Kueue's controller manager (built by build.sh from sigs.k8s.io/kueue) against the test bed's apiserver.

Its CRDs come from the module source build.sh copied next to the binary (no download). Kueue serves
webhooks (admission and CRD conversion) but none is registered here: the apiserver reaches nothing by a
Service name on the test bed, and the operator does what Kueue's Job webhook would (child Jobs are created
suspended with the queue label). Kueue still needs serving certificates at start-up; its internal cert
management makes them (a Secret in kueue-system, which the test bed writes to its cert dir as a kubelet
would mount it) and injects its CA into whatever it
finds: the multi-version CRDs therefore carry a conversion webhook stanza until Kueue is ready, then
`strategy: None` (only the storage version v1beta2 is served, which every client here, Kueue included,
uses, so nothing needs converting). Metrics and the
visibility API server are off.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import requests
import yaml

from .kube import Cluster, binary_dirs
from .procs import LOOPBACK, Proc, free_port, wait_until

NAMESPACE = "kueue-system"
SECRET = "kueue-webhook-server-cert"
SERVICE = "kueue-webhook-service"


def _with_conversion_stanza(crd: dict[str, Any], url: str) -> dict[str, Any]:
    """A CRD with more than one version gets the conversion webhook stanza Kueue's cert rotator expects, and
    only its storage version is served: the apiserver's watch cache of another served version would call
    the webhook, whose certificate names a Service, not the loopback address."""
    if len(crd["spec"].get("versions") or []) > 1:
        for v in crd["spec"]["versions"]:
            v["served"] = bool(v.get("storage"))
        crd["spec"]["conversion"] = {
            "strategy": "Webhook",
            "webhook": {"clientConfig": {"url": url}, "conversionReviewVersions": ["v1"]},
        }
    return crd


class Kueue:
    """Session-wide Kueue. Public: start(), stop(), proc."""

    def __init__(self, cluster: Cluster, work_dir: Path, log_dir: Path):
        self.cluster = cluster
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.proc: Proc | None = None
        self.converted: list[str] = []  # CRDs given the conversion stanza for the cert rotator

    def start(self, timeout: float = 180.0) -> Kueue:
        dirs = binary_dirs()
        if "KUEUE_BIN" not in dirs:
            raise RuntimeError("Kueue not built (no KUEUE_BIN in versions.env): run tests/testbed/build.sh")
        binary = Path(dirs["KUEUE_BIN"]) / "kueue"
        webhook_port, probe_port = free_port(), free_port()
        crd_dir = self.work_dir / "crds"
        crd_dir.mkdir(parents=True, exist_ok=True)
        self.converted = []
        for src in sorted(Path(dirs["KUEUE_CRDS"]).glob("*.yaml")):
            crd = _with_conversion_stanza(
                yaml.safe_load(src.read_text()), f"https://{LOOPBACK}:{webhook_port}/convert"
            )
            if "conversion" in crd["spec"]:
                self.converted.append(crd["metadata"]["name"])
            dst = crd_dir / src.name
            dst.write_text(json.dumps(crd))
            self.cluster.apply_crd(dst)
        kc = self.cluster.kubectl
        if kc("get", "namespace", NAMESPACE, check=False).returncode != 0:
            kc("create", "namespace", NAMESPACE)
        if kc("get", "secret", SECRET, "-n", NAMESPACE, check=False).returncode != 0:
            kc("create", "secret", "generic", SECRET, "-n", NAMESPACE)  # the cert rotator fills it
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"{LOOPBACK}:{probe_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"port": webhook_port, "host": LOOPBACK, "certDir": str(self.work_dir / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {
                "enable": True,
                "webhookServiceName": SERVICE,
                "webhookSecretName": SECRET,
            },
            "clientConnection": {"qps": 50, "burst": 100},
            "integrations": {"frameworks": ["batch/job"]},
        }
        config_path = self.work_dir / "kueue-config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.proc = Proc(
            "kueue",
            [
                str(binary),
                f"--config={config_path}",
                f"--kubeconfig={self.cluster.kubeconfig}",
                "--feature-gates=VisibilityOnDemand=false",
                "--zap-log-level=2",
            ],
            self.log_dir,
        )
        proc = self.proc
        # The rotator writes the certificate into the Secret and waits for it to appear in certDir, where a
        # kubelet would mount the Secret: the test bed writes the files instead.
        data = wait_until(
            lambda: proc.check_alive() and self._secret_data(), timeout, f"Secret {SECRET} filled by Kueue"
        )
        cert_dir = self.work_dir / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        for key, value in data.items():
            (cert_dir / key).write_bytes(base64.b64decode(value))
        wait_until(
            lambda: proc.check_alive() and self._ready(f"http://{LOOPBACK}:{probe_port}/readyz"),
            timeout,
            "kueue /readyz",
        )
        # Injected and ready: take the stanza away again, or the apiserver's watch cache keeps calling the
        # webhook (whose certificate names a Service, not 127.0.0.1) and logs errors many times a second.
        # Kueue's rotator only logs its failed re-injections from now on.
        patch = json.dumps({"spec": {"conversion": {"strategy": "None", "webhook": None}}})
        for name in self.converted:
            kc("patch", "crd", name, "--type=merge", "-p", patch)
        return self

    def _secret_data(self) -> dict[str, str] | None:
        data = self.cluster.get_json("secret", SECRET, "-n", NAMESPACE).get("data") or {}
        return data if data.get("tls.crt") and data.get("tls.key") else None

    @staticmethod
    def _ready(url: str) -> bool:
        try:
            return requests.get(url, timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
