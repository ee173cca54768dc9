"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and the KWOK controller pretending to be the kubelets of a few GPU nodes.

Binaries come from tests/testbed/build.sh (run via tests/testbed/provision.sh). Nothing here ever dials or
hands out an address outside 127.0.0.0/8: node IPs and pod CIDRs are loopback too.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import requests

from .pki import Pki, write_kubeconfig
from .procs import LOOPBACK, Proc, bed_index, free_port, wait_until

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("SFTJOB_TESTBED_CACHE", Path.home() / ".cache" / "sftjob-testbed"))
PROVISION_HINT = (
    "run `bash tests/testbed/provision.sh` (builds the control plane into ~/.cache/sftjob-testbed)"
)

GPU_NODES = 4
GPUS_PER_NODE = 8
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
POOL_LABEL = "sftjob.dev/node-pool"
POOL = "gpu-h100"
STAGES = HERE / "kwok-stages.yaml"
STAGES_CIDR = "cidr: 127.20.0.1/16"  # kwok-stages.yaml's pod pool: each test bed gets its own (bed_cidr)


def bed_cidr(index: int) -> str:
    """The pod CIDR of test bed `index` (procs.bed_index): 127.20.0.0/16, 127.21.0.0/16, ... (kwok hands out
    from .0.1). Each bed has its own pod and node addresses, so two beds never hand a pod the same loopback
    IP (a test serves a pod's /metrics on it)."""
    return f"127.{20 + index}.0.0/16"


POD_CIDR = bed_cidr(bed_index())
SERVICE_CIDR = "10.0.0.0/24"  # only allocated, never dialled: no kube-proxy runs


def read_env_file(path: Path, missing: str) -> dict[str, str]:
    """KEY=VALUE lines written by build.sh / images.sh; RuntimeError(missing) when the file is absent."""
    if not path.exists():
        raise RuntimeError(missing)
    return dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)


def binary_dirs() -> dict[str, str]:
    """build.sh's versions.env: where each component's binaries are (versions live only in build.sh)."""
    env_file = CACHE / "versions.env"
    return read_env_file(env_file, f"test bed binaries not built ({env_file} missing): {PROVISION_HINT}")


def find_binaries() -> dict[str, Path]:
    """Paths of every binary from build.sh's versions.env; a clear error (never a skip) when missing."""
    dirs = binary_dirs()
    names = {
        "etcd": "ETCD_BIN",
        "kube-apiserver": "KUBERNETES_BIN",
        "kube-controller-manager": "KUBERNETES_BIN",
        "kube-scheduler": "KUBERNETES_BIN",
        "kwok": "KWOK_BIN",
    }
    found = {name: Path(dirs.get(var, "/nonexistent")) / name for name, var in names.items()}
    missing = [str(p) for p in found.values() if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError(f"test bed binaries missing: {', '.join(missing)}: {PROVISION_HINT}")
    if not shutil.which("kubectl"):
        raise RuntimeError("kubectl not on PATH: install it (the test bed drives the cluster with kubectl)")
    return found


def gpu_node(i: int, bed: int = 0) -> dict[str, Any]:
    """A fake GPU node: capacity, labels and loopback addresses are ours, kwok keeps it Ready."""
    name = f"gpu-node-{i}"
    resources = {
        "cpu": "96",
        "memory": "1Ti",
        "pods": "110",
        "ephemeral-storage": "1Ti",
        "nvidia.com/gpu": str(GPUS_PER_NODE),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "testbed-8x-h100",
                "topology.kubernetes.io/zone": "testbed-a",
                POOL_LABEL: POOL,
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(GPUS_PER_NODE),
            },
        },
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": f"127.10.{bed}.{i + 1}"},
                {"type": "Hostname", "address": name},
            ],
        },
    }


class Cluster:
    """The session-wide control plane. Public API: kubeconfig, server, logs_dir, kubectl(), api_client(),
    sa_kubeconfig(), create_namespace(), nodes."""

    def __init__(
        self,
        work_dir: Path,
        logs_dir: Path,
        gpu_nodes: int = GPU_NODES,
        audit_policy: dict[str, Any] | None = None,
    ):
        """`gpu_nodes`: how many fake GPU nodes KWOK keeps (benchmarks use more); `audit_policy`: an
        audit.k8s.io/v1 Policy: the apiserver then writes JSON audit events to `self.audit_log` (only
        benchmarks ask for it: benchmarks/operator_scale.py counts the operator's requests from it)."""
        self.work_dir = work_dir
        self.logs_dir = logs_dir
        self.pki = Pki(work_dir / "pki")
        self.port = free_port()
        self.server = f"https://{LOOPBACK}:{self.port}"
        self.kubeconfig = work_dir / "admin.kubeconfig"
        self.nodes = [f"gpu-node-{i}" for i in range(gpu_nodes)]
        self.audit_policy = audit_policy
        self.audit_log = work_dir / "audit.log"
        self.procs: list[Proc] = []

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Cluster:
        bins = find_binaries()
        t0 = time.monotonic()
        laps: list[str] = []

        def lap(what: str) -> None:  # start-up time per step, printed at the end (cold vs warm machines)
            laps.append(f"{what} {time.monotonic() - t0:.1f}s")

        self.pki.create()
        write_kubeconfig(
            self.kubeconfig,
            self.server,
            self.pki.ca_crt,
            {"client-certificate": str(self.pki.admin_crt), "client-key": str(self.pki.admin_key)},
        )
        etcd_url = self._start_etcd(bins["etcd"], timeout)
        lap("etcd")
        self._start_apiserver(bins["kube-apiserver"], etcd_url, timeout)
        lap("kube-apiserver")
        kc = str(self.kubeconfig)
        common = [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--bind-address={LOOPBACK}",
            "--leader-elect=false",
        ]
        kcm_port, sched_port = free_port(), free_port()
        self._spawn(
            "kube-controller-manager",
            [
                str(bins["kube-controller-manager"]),
                *common,
                f"--secure-port={kcm_port}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_crt}",
                "--use-service-account-credentials=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*",
                "--node-monitor-grace-period=40s",
                "--concurrent-job-syncs=5",
                # Client-side default is 20 QPS: too few when a test creates hundreds of Jobs.
                "--kube-api-qps=100",
                "--kube-api-burst=200",
            ],
        )
        self._spawn("kube-scheduler", [str(bins["kube-scheduler"]), *common, f"--secure-port={sched_port}"])
        kwok_port = free_port()
        self._spawn(
            "kwok",
            [
                str(bins["kwok"]),
                f"--kubeconfig={kc}",
                f"--config={self._kwok_config()}",
                # Only the fake GPU nodes: the real node (tests/testbed/node.py) has a kubelet of its own.
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-lease-duration-seconds=40",
                f"--server-address={LOOPBACK}:{kwok_port}",
                f"--node-ip={LOOPBACK}",
            ],
        )
        for name, url in (
            ("kube-controller-manager", f"https://{LOOPBACK}:{kcm_port}/healthz"),
            ("kube-scheduler", f"https://{LOOPBACK}:{sched_port}/healthz"),
            ("kwok", f"http://{LOOPBACK}:{kwok_port}/healthz"),
        ):
            proc = self._proc(name)
            wait_until(
                lambda p=proc, u=url: p.check_alive() and self._ok(u, verify=False),
                timeout,
                f"{name} /healthz",
            )
        lap("controllers+kwok")
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": [gpu_node(i, bed_index()) for i in range(len(self.nodes))],
                }
            ),
        )
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={int(timeout)}s")
        # Pods need the namespace's default ServiceAccount, made by the controller-manager.
        wait_until(
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
            timeout,
            "the default ServiceAccount (kube-controller-manager running?)",
        )
        lap("nodes Ready")
        (self.logs_dir / "kubeconfig-path").write_text(f"{self.kubeconfig}\n")
        print(f"test bed control plane ready at {self.server}: {', '.join(laps)}")
        return self

    def stop(self) -> None:
        """Stop in reverse start order (kwok and controllers before the apiserver, etcd last)."""
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def _kwok_config(self) -> Path:
        """kwok-stages.yaml with this bed's pod pool (one file holds the stages; only the CIDR differs)."""
        text = STAGES.read_text()
        assert STAGES_CIDR in text, f"{STAGES} no longer says {STAGES_CIDR!r}"
        pool = "cidr: " + POD_CIDR.replace(".0.0/", ".0.1/")
        path = self.work_dir / "kwok-stages.yaml"
        path.write_text(text.replace(STAGES_CIDR, pool))
        return path

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.logs_dir)
        self.procs.append(proc)
        return proc

    def _proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    @staticmethod
    def _ok(url: str, **kw: Any) -> bool:
        with warnings.catch_warnings():  # the controllers' /healthz certs are self-signed on purpose
            warnings.simplefilter("ignore")
            return requests.get(url, timeout=2, **kw).status_code == 200

    def _start_etcd(self, etcd: Path, timeout: float) -> str:
        client, peer = free_port(), free_port()
        url = f"http://{LOOPBACK}:{client}"
        proc = self._spawn(
            "etcd",
            [
                str(etcd),
                "--name=testbed",
                f"--data-dir={self.work_dir / 'etcd'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls=http://{LOOPBACK}:{peer}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{peer}",
                f"--initial-cluster=testbed=http://{LOOPBACK}:{peer}",
                # Throwaway data: no fsync makes etcd fast on a busy disk.
                "--unsafe-no-fsync",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        wait_until(
            lambda: (
                proc.check_alive() and requests.get(f"{url}/health", timeout=2).json()["health"] == "true"
            ),
            timeout,
            "etcd /health",
        )
        return url

    def _audit_flags(self) -> list[str]:
        if self.audit_policy is None:
            return []
        policy = self.work_dir / "audit-policy.json"  # JSON is YAML: the apiserver reads it
        policy.write_text(json.dumps(self.audit_policy))
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",  # no rotation: the reader wants one file
            "--audit-log-mode=blocking",  # written before the response: nothing lost at stop
        ]

    def _start_apiserver(self, apiserver: Path, etcd_url: str, timeout: float) -> None:
        p = self.pki
        proc = self._spawn(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={self.port}",
                f"--tls-cert-file={p.serving_crt}",
                f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_crt}",
                # Node: the real node's kubelet (tests/testbed/node.py) gets exactly a kubelet's rights.
                "--authorization-mode=Node,RBAC",
                f"--kubelet-client-certificate={p.kubelet_client_crt}",
                f"--kubelet-client-key={p.kubelet_client_key}",
                f"--kubelet-certificate-authority={p.ca_crt}",
                "--kubelet-preferred-address-types=InternalIP",
                # Without a front-proxy CA the controllers' delegated authn logs an error every second.
                f"--requestheader-client-ca-file={p.ca_crt}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Endpoints may not hold loopback addresses, so the apiserver must not publish its own.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                f"--cert-dir={self.work_dir / 'apiserver-certs'}",
                *self._audit_flags(),
            ],
        )
        cert = (str(p.admin_crt), str(p.admin_key))
        wait_until(
            lambda: proc.check_alive() and self._ok(f"{self.server}/readyz", cert=cert, verify=str(p.ca_crt)),
            timeout,
            f"kube-apiserver /readyz at {self.server}",
        )

    # ---- helpers for tests -----------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the test bed; with check=True a failure raises with stdout and stderr."""
        argv = ["kubectl", f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        r = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
        return r

    def apply_crd(self, path: Path | str, timeout: float = 60) -> None:
        """Apply a CRD and wait until it is Established (polled: `kubectl wait` races a CRD whose status
        has no conditions yet)."""
        doc = self.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", str(path), "-o", "json"
        ).stdout
        name = json.loads(doc)["metadata"]["name"]

        def established() -> bool:
            conditions = self.get_json("crd", name).get("status", {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_until(established, timeout, f"CRD {name} Established")

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for the admin user (caller closes it, or use it as a context)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def create_namespace(self, hint: str = "test") -> str:
        """A fresh namespace whose name is derived from `hint` (e.g. the test name) plus a random suffix."""
        base = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[:40].strip("-") or "test"
        name = f"{base}-{secrets.token_hex(3)}"
        self.kubectl("create", "namespace", name)
        wait_until(
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
            30,
            f"default ServiceAccount in namespace {name}",
        )
        return name

    def delete_namespace(self, name: str, timeout: int = 60) -> None:
        """Delete a namespace and wait until its pods are gone: the GPU nodes are shared, so leftover pods
        would skew the next test's scheduling. (Waiting for the namespace itself costs ~5 s more.)"""
        self.kubectl("delete", "namespace", name, "--wait=false", check=False)
        # Terminating now, the namespace admits no new objects. The namespace controller only starts
        # deleting content after ~5 s, so remove the pods and their owners ourselves (KWOK drops them at once).
        self.kubectl(
            "delete",
            "jobs,deployments,statefulsets,replicasets,pods",
            "--all",
            "-n",
            name,
            "--wait=false",
            check=False,
        )
        self.kubectl(
            "wait", "--for=delete", "pods", "--all", "-n", name, f"--timeout={timeout}s", check=False
        )

    def sa_kubeconfig(self, namespace: str, service_account: str, duration: str = "2h") -> Path:
        """A token kubeconfig for `service_account` (created if missing): it has only what RBAC grants it."""
        r = self.kubectl("create", "serviceaccount", service_account, "-n", namespace, check=False)
        if r.returncode != 0 and "already exists" not in r.stderr.lower():
            raise RuntimeError(f"creating ServiceAccount {namespace}/{service_account}: {r.stderr}")
        token = self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        path = self.work_dir / f"sa-{namespace}-{service_account}.kubeconfig"
        return write_kubeconfig(
            path, self.server, self.pki.ca_crt, {"token": token}, name=f"{namespace}-{service_account}"
        )
