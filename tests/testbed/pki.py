"""Certificates and kubeconfigs for the test-bed control plane, made with the openssl CLI (no extra deps)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

# The in-cluster names kube-apiserver answers to, plus the loopback address every client actually dials.
SERVING_SANS = (
    "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
    "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
)


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


def _ec_key(name: str, d: Path) -> None:
    # P-256 keys: generated instantly, unlike RSA on a busy 2-core machine.
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=d)


class Pki:
    """A throwaway CA, the apiserver's serving cert, an admin client cert and the SA signing key pair."""

    def __init__(self, d: Path):
        self.dir = d
        self.ca_crt = d / "ca.crt"
        self.ca_key = d / "ca.key"
        self.serving_crt = d / "apiserver.crt"
        self.serving_key = d / "apiserver.key"
        self.admin_crt = d / "admin.crt"
        self.admin_key = d / "admin.key"
        self.sa_key = d / "sa.key"
        self.kubelet_client_crt = d / "apiserver-kubelet-client.crt"
        self.kubelet_client_key = d / "apiserver-kubelet-client.key"
        self.sa_pub = d / "sa.pub"

    def create(self) -> Pki:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        _ec_key("ca.key", d)
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=sftjob-testbed-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=d,
        )
        self.leaf(
            "apiserver", "/CN=kube-apiserver", f"subjectAltName={SERVING_SANS}", "extendedKeyUsage=serverAuth"
        )
        # Group system:masters is bound to cluster-admin by RBAC bootstrap policy.
        self.leaf("admin", "/O=system:masters/CN=testbed-admin", "extendedKeyUsage=clientAuth")
        # The apiserver's identity towards kubelets (logs, exec): authorized by the kubelet's webhook.
        self.leaf(
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "extendedKeyUsage=clientAuth",
        )
        # Service-account tokens are signed with RSA by convention (RS256 is what every verifier accepts).
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=d)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        return self

    def leaf(self, name: str, subject: str, *extensions: str) -> tuple[Path, Path]:
        """A cert/key pair signed by the CA (e.g. a kubelet's client or serving cert); returns (crt, key)."""
        _ec_key(f"{name}.key", self.dir)
        ext: list[str] = []
        for e in ("basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature", *extensions):
            ext += ["-addext", e]
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            f"{name}.key",
            "-out",
            f"{name}.crt",
            "-days",
            "30",
            "-subj",
            subject,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            *ext,
            cwd=self.dir,
        )
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str], name: str = "testbed") -> Path:
    """A one-context kubeconfig; `user` is e.g. {"token": ...} or {"client-certificate": ..., "client-key": ...}."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca)}}
                ],
                "users": [{"name": name, "user": user}],
                "contexts": [{"name": name, "context": {"cluster": "testbed", "user": name}}],
                "current-context": name,
            }
        )
    )
    path.chmod(0o600)
    return path
