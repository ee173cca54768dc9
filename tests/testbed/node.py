"""One real Kubernetes node next to the KWOK GPU nodes: containerd + runc, a kubelet, kube-proxy (iptables),
the CNI bridge, and CoreDNS serving cluster.local — so the operator's pods really run.

Addresses (all on this machine): the test bed's own bridge `sftbr0` holds 10.234.0.1, which is the node's
IP, the pods' gateway and where CoreDNS and the forwarders listen; pods get 10.234.0.10-250 on that bridge.
Services on loopback that pods need (the apiserver, SeaweedFS) are reached through socat forwarders on the
node IP. Pod traffic cannot leave the machine whatever `net.ipv4.ip_forward` says (podman turns it on): a
policy-routing rule sends everything that arrives from the bridge to a table holding only the pod subnet and
an `unreachable` default, and local delivery (the node IP, ClusterIPs DNAT'd to it) is decided before that
rule. pod<->pod is layer 2 on the bridge. test_real_node_e2e checks the configuration.

Needs root, Debian's containerd/runc/CNI plugins/socat (provision.sh), the kubelet, kube-proxy, CoreDNS and
pause binaries (build.sh) and the images (images.sh). The node is tainted: only pods that tolerate
REAL_NODE_TAINT land here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from .images import ImageSet, load_into_containerd
from .kube import CACHE, Cluster, binary_dirs
from .pki import write_kubeconfig
from .procs import LOOPBACK, Proc, free_port, wait_until

NODE_NAME = "real-node-0"
BRIDGE = "sftbr0"
ROUTE_TABLE = "234"  # policy routing for packets from the bridge: pod subnet or unreachable
NODE_IP = "10.234.0.1"
POD_SUBNET = "10.234.0.0/24"
REAL_NODE_LABEL = "sftjob.dev/real-node"
REAL_NODE_TAINT = {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
CNI_BIN = Path("/usr/lib/cni")
# Where `RealNode.schedule_here()` sends a pod: the node's label plus a toleration of its taint.
NODE_SELECTOR = {REAL_NODE_LABEL: "true"}
TOLERATIONS = [{**REAL_NODE_TAINT, "operator": "Equal"}]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def node_binaries() -> dict[str, Path]:
    """kubelet, kube-proxy, coredns and pause from build.sh; host tools from Debian. Clear errors, no skips."""
    dirs = binary_dirs()
    found = {
        "kubelet": Path(dirs.get("NODE_BIN", "/nonexistent")) / "kubelet",
        "kube-proxy": Path(dirs.get("NODE_BIN", "/nonexistent")) / "kube-proxy",
        "coredns": Path(dirs.get("COREDNS_BIN", "/nonexistent")) / "coredns",
        "pause": Path(dirs.get("PAUSE_BIN", "/nonexistent")) / "pause",
    }
    for tool in ("containerd", "ctr", "runc", "socat", "iptables", "ip", "conntrack", "podman"):
        found[tool] = Path(shutil.which(tool) or f"/nonexistent/{tool}")
    missing = [f"{k} ({v})" for k, v in found.items() if not os.access(v, os.X_OK)]
    if not (CNI_BIN / "bridge").exists():
        missing.append(f"CNI plugins in {CNI_BIN}")
    if missing:
        raise RuntimeError(f"real node: missing {', '.join(missing)}: run `bash tests/testbed/provision.sh`")
    if os.geteuid() != 0:
        raise RuntimeError("real node: needs root (network namespaces, containerd, kubelet)")
    return found


class RealNode:
    """The session's real node. Public: name, ip, images, kubectl via the cluster, forward(), logs_dir."""

    def __init__(self, cluster: Cluster, work_dir: Path, images: ImageSet):
        self.cluster = cluster
        self.work = work_dir
        self.images = images
        self.name = NODE_NAME
        self.ip = NODE_IP
        self.logs_dir = cluster.logs_dir
        # Short: unix socket paths are limited to 108 bytes.
        self.run_dir = Path(f"/run/sftjob-testbed-{os.getpid()}")
        self.sock = self.run_dir / "containerd.sock"
        self.procs: list[Proc] = []
        self.forwards: dict[int, int] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> RealNode:
        bins = node_binaries()
        t0 = time.monotonic()
        laps: list[str] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._network()
        self.forward(self.cluster.port, self.cluster.port)  # the apiserver, for the `kubernetes` Service
        self._kubernetes_endpoints()
        laps.append(f"network {time.monotonic() - t0:.1f}s")
        self._containerd(bins, timeout)
        laps.append(f"containerd {time.monotonic() - t0:.1f}s")
        load_into_containerd(bins["ctr"], self.sock, self.images, self.logs_dir)
        laps.append(f"images {time.monotonic() - t0:.1f}s")
        self._coredns(bins, timeout)
        self._kube_proxy(bins, timeout)
        self._kubelet(bins, timeout)
        laps.append(f"node Ready {time.monotonic() - t0:.1f}s")
        print(f"test bed real node {self.name} ({self.ip}) ready: {', '.join(laps)}")
        return self

    def stop(self) -> None:
        # The cluster as it was: the worker's later modules expect only the KWOK nodes (tests/e2e lists them).
        self.cluster.kubectl("delete", "node", self.name, "--wait=false", check=False)
        self.cluster.kubectl("delete", "endpointslice", "kubernetes", "-n", "default", check=False)
        # Reverse start order (the kubelet first: it would restart pods), then what the runtime left behind.
        for proc in reversed(self.procs):
            proc.stop(timeout=30)
        self.procs.clear()
        self._cleanup_runtime()
        kube_proxy = node_binaries()["kube-proxy"]
        _run(str(kube_proxy), "--cleanup", check=False)  # its KUBE-* iptables chains
        self._unconfine()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def forward(self, node_port: int, loopback_port: int) -> str:
        """Make a loopback-only server reachable from pods at NODE_IP:node_port; returns host:port."""
        if node_port not in self.forwards:
            self._spawn(
                f"forward-{node_port}",
                [
                    "socat",
                    f"TCP-LISTEN:{node_port},bind={NODE_IP},fork,reuseaddr",
                    f"TCP:{LOOPBACK}:{loopback_port}",
                ],
            )
            self.forwards[node_port] = loopback_port
            wait_until(lambda: _tcp_open(NODE_IP, node_port), 10, f"forwarder on {NODE_IP}:{node_port}")
        return f"{NODE_IP}:{node_port}"

    # ---- pieces ----------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.logs_dir, env=env)
        self.procs.append(proc)
        return proc

    def _network(self) -> None:
        """The bridge with the node IP, confined by policy routing (see the module docstring)."""
        self._cleanup_runtime()  # leftovers of a killed session
        self._unconfine()
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        _run("ip", "route", "add", POD_SUBNET, "dev", BRIDGE, "table", ROUTE_TABLE)
        _run("ip", "route", "add", "unreachable", "default", "table", ROUTE_TABLE)
        _run("ip", "rule", "add", "iif", BRIDGE, "lookup", ROUTE_TABLE, "priority", "100")
        conf = self.run_dir / "cni"
        conf.mkdir(exist_ok=True)
        # isGateway false + our own route: the plugin then neither enables forwarding nor adds NAT.
        (conf / "10-sftjob.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "sftjob-testbed",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": False,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [
                                    [
                                        {
                                            "subnet": POD_SUBNET,
                                            "rangeStart": "10.234.0.10",
                                            "rangeEnd": "10.234.0.250",
                                            "gateway": NODE_IP,
                                        }
                                    ]
                                ],
                                "routes": [{"dst": "0.0.0.0/0", "gw": NODE_IP}],
                                "dataDir": str(self.run_dir / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                        {"type": "loopback"},
                    ],
                },
                indent=1,
            )
        )

    def _unconfine(self) -> None:
        _run("ip", "rule", "del", "iif", BRIDGE, "lookup", ROUTE_TABLE, check=False)
        _run("ip", "route", "flush", "table", ROUTE_TABLE, check=False)
        _run("ip", "link", "del", BRIDGE, check=False)

    def _kubernetes_endpoints(self) -> None:
        """The `kubernetes` Service's endpoint (the apiserver runs with --endpoint-reconciler-type=none):
        the forwarder on the node IP, so in-cluster clients reach the apiserver through the ClusterIP."""
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": "kubernetes",
                    "endpointslice.kubernetes.io/managed-by": "sftjob-testbed",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": self.cluster.port, "protocol": "TCP"}],
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(slice_))

    def _containerd(self, bins: dict[str, Path], timeout: float) -> None:
        # The content store persists in the cache (the trainer image is GBs: import once per image id);
        # state, sockets and CNI config are per session.
        root = CACHE / "node" / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "containerd.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(
            f"""version = 2
root = "{root}"
state = "{self.run_dir / "containerd-state"}"
[grpc]
  address = "{self.sock}"
[{cri}]
  sandbox_image = "{self.images.pause}"
  # Sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE (this sandbox lacks it).
  restrict_oom_score_adj = true
  enable_selinux = false
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.run_dir / "cni"}"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
"""
        )
        proc = self._spawn("containerd", [str(bins["containerd"]), f"--config={config}"])
        wait_until(
            lambda: proc.check_alive() and self._ctr(bins, "version").returncode == 0,
            timeout,
            "containerd",
        )

    def _ctr(self, bins: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
        return _run(str(bins["ctr"]), f"--address={self.sock}", "--namespace=k8s.io", *args, check=False)

    def _cleanup_runtime(self) -> None:
        """Remove every container, shim, pod network namespace and mount of this node and of any earlier
        session that died without stopping its node (its shims and containers outlive it)."""
        runc_root = "/run/containerd/runc/k8s.io"  # containerd's runc v2 shims keep their state here
        listed = _run("runc", f"--root={runc_root}", "list", "-q", check=False).stdout.split()
        for container in listed:
            _run("runc", f"--root={runc_root}", "delete", "--force", container, check=False)
        _run(
            "pkill",
            "-f",
            "containerd-shim-runc-v2 -namespace k8s.io .*-address /run/sftjob-testbed-",
            check=False,
        )
        for netns in _run("ip", "netns", "list", check=False).stdout.split():
            if netns.startswith("cni-"):
                _run("ip", "netns", "delete", netns, check=False)
        for mount in reversed(Path("/proc/mounts").read_text().splitlines()):
            point = mount.split()[1]
            if point.startswith(("/run/sftjob-testbed-", str(self.work))):
                _run("umount", "-l", point, check=False)
        for stale in Path("/run").glob("sftjob-testbed-*"):
            if stale != self.run_dir:
                shutil.rmtree(stale, ignore_errors=True)

    def _coredns(self, bins: dict[str, Path], timeout: float) -> None:
        health, ready = free_port(), free_port()
        kc = self.cluster.kubeconfig
        corefile = self.run_dir / "Corefile"
        # cluster.local from the apiserver; every other name is NXDOMAIN: nothing is ever forwarded out.
        corefile.write_text(
            f"""cluster.local:53 in-addr.arpa:53 {{
    bind {NODE_IP}
    errors
    health {LOOPBACK}:{health}
    ready {LOOPBACK}:{ready}
    kubernetes cluster.local in-addr.arpa {{
        kubeconfig {kc}
        pods insecure
    }}
}}
.:53 {{
    bind {NODE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""
        )
        proc = self._spawn("coredns", [str(bins["coredns"]), "-conf", str(corefile)])
        wait_until(
            lambda: proc.check_alive() and _http_ok(f"http://{LOOPBACK}:{ready}/ready"),
            timeout,
            "CoreDNS /ready",
        )

    def _identity(self, name: str, subject: str) -> Path:
        """A client-cert kubeconfig for a node component (its own user, as on a real cluster)."""
        crt, key = self.cluster.pki.leaf(name, subject, "extendedKeyUsage=clientAuth")
        return write_kubeconfig(
            self.run_dir / f"{name}.kubeconfig",
            self.cluster.server,
            self.cluster.pki.ca_crt,
            {"client-certificate": str(crt), "client-key": str(key)},
            name=name,
        )

    def _kube_proxy(self, bins: dict[str, Path], timeout: float) -> None:
        # system:kube-proxy is bound to ClusterRole system:node-proxier by the bootstrap policy.
        kc = self._identity("kube-proxy", "/CN=system:kube-proxy")
        health = free_port()
        config = self.run_dir / "kube-proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(kc)},
                    "mode": "iptables",
                    "hostnameOverride": NODE_NAME,
                    "clusterCIDR": POD_SUBNET,
                    "bindAddress": NODE_IP,
                    "healthzBindAddress": f"{LOOPBACK}:{health}",
                    "metricsBindAddress": f"{LOOPBACK}:{free_port()}",
                    "nodePortAddresses": [f"{NODE_IP}/32"],
                    # Leave the sandbox's sysctls alone: no conntrack resizing, no route_localnet.
                    "conntrack": {"maxPerCore": 0, "min": 0},
                    "iptables": {"localhostNodePorts": False},
                }
            )
        )
        proc = self._spawn("kube-proxy", [str(bins["kube-proxy"]), f"--config={config}"])
        wait_until(
            lambda: proc.check_alive() and _http_ok(f"http://{LOOPBACK}:{health}/livez"),
            timeout,
            "kube-proxy /livez",
        )

    def _kubelet(self, bins: dict[str, Path], timeout: float) -> None:
        pki = self.cluster.pki
        kc = self._identity(f"kubelet-{NODE_NAME}", f"/O=system:nodes/CN=system:node:{NODE_NAME}")
        serving_crt, serving_key = pki.leaf(
            f"kubelet-serving-{NODE_NAME}",
            f"/O=system:nodes/CN=system:node:{NODE_NAME}",
            f"subjectAltName=IP:{NODE_IP},DNS:{NODE_NAME}",
            "extendedKeyUsage=serverAuth",
        )
        resolv = self.run_dir / "resolv.conf"
        resolv.write_text("")  # pods get cluster DNS only, none of the host's search domains
        health = free_port()
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK,
            "healthzPort": health,
            "tlsCertFile": str(serving_crt),
            "tlsPrivateKeyFile": str(serving_key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_crt)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            "failCgroupV1": False,
            "clusterDNS": [NODE_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": str(resolv),
            "podLogsDir": str(self.run_dir / "pod-logs"),
            "registerWithTaints": [REAL_NODE_TAINT],
            "maxPods": 30,
            # The images are GBs on a shared disk: never evict or garbage-collect them during a run.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "shutdownGracePeriod": "0s",
        }
        path = self.run_dir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = self._spawn(
            "kubelet",
            [
                str(bins["kubelet"]),
                f"--config={path}",
                f"--kubeconfig={kc}",
                f"--root-dir={self.work / 'kubelet'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={REAL_NODE_LABEL}=true,node.kubernetes.io/instance-type=testbed-real-cpu",
                "--v=1",
            ],
        )
        wait_until(
            lambda: proc.check_alive() and _node_ready(self.cluster, NODE_NAME),
            timeout,
            f"node {NODE_NAME} Ready (kubelet log: {proc.log_path})",
            interval=1.0,
        )


def _tcp_open(host: str, port: int) -> bool:
    import socket

    with socket.create_connection((host, port), timeout=1):
        return True


def _http_ok(url: str) -> bool:
    import requests

    return requests.get(url, timeout=2).status_code == 200


def _node_ready(cluster: Cluster, name: str) -> bool:
    r = cluster.kubectl("get", "node", name, "-o", "json", check=False)
    if r.returncode != 0:
        return False
    conditions = json.loads(r.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
