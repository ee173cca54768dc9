"""Fixtures for tests on the real node (tests/testbed/node.py): the node itself, S3 reachable from pods, and
the operator installed by its Helm chart from the locally built image into a `restricted` namespace.

Fixtures
  real_node        module   the node (containerd, kubelet, kube-proxy, CoreDNS) joined to `kube`; it leaves
                            the cluster afterwards (the worker's later modules see the KWOK nodes only)
  pod_s3           module   (bucket, endpoint) of the SeaweedFS S3 server as pods reach it (the node's IP)
  node_namespace   module   a namespace enforcing Pod Security `restricted`, with the S3 credentials Secret
  chart_operator   module   `helm install` of the chart into node_namespace, Ready; yields the release info
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from testbed.helm import CHART, helm
from testbed.images import image_set
from testbed.node import NODE_SELECTOR, TOLERATIONS, RealNode
from testbed.seaweed import S3Bucket, SeaweedServer

S3_SECRET = "s3-credentials"
RELEASE = "sftjob"


@pytest.fixture(scope="module")
def real_node(kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    node = RealNode(kube, tmp_path_factory.mktemp("node"), image_set())
    try:
        node.start()
        yield node
    finally:
        node.stop()


@dataclass(frozen=True)
class PodS3:
    bucket: S3Bucket  # the host's view (loopback endpoint): for the test's own uploads and checks
    endpoint: str  # the pods' view: the same server through the node IP


@pytest.fixture(scope="module")
def pod_s3(seaweed_server: SeaweedServer, real_node: RealNode) -> PodS3:
    port = seaweed_server.s3_port
    return PodS3(seaweed_server.new_bucket(), f"http://{real_node.forward(port, port)}")


@pytest.fixture(scope="module")
def node_namespace(
    kube: Any, real_node: RealNode, pod_s3: PodS3, request: pytest.FixtureRequest
) -> Iterator[str]:
    name = kube.create_namespace(request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    # Every pod of the chart and of an SFTJob must pass the strictest Pod Security level.
    kube.kubectl(
        "label",
        "namespace",
        name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    b = pod_s3.bucket
    kube.kubectl(
        "create",
        "secret",
        "generic",
        S3_SECRET,
        "-n",
        name,
        f"--from-literal=AWS_ACCESS_KEY_ID={b.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={b.secret_key}",
    )
    yield name
    kube.delete_namespace(name, timeout=120)


@dataclass(frozen=True)
class ChartOperator:
    namespace: str
    release: str
    pod: dict[str, Any]  # the operator pod as the apiserver returned it once Ready


@pytest.fixture(scope="module")
def chart_operator(kube: Any, real_node: RealNode, node_namespace: str) -> Iterator[ChartOperator]:
    images = real_node.images
    repo, tag = images.operator.rsplit(":", 1)
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "trainerImage": images.trainer,
        "watch": {"namespaces": [node_namespace]},
        "operator": {"progressIntervalSeconds": 2},
        "nodeSelector": NODE_SELECTOR,
        "tolerations": TOLERATIONS,
        # The node tests' SFTJobs use the test bed's bucket; the admin policy has its own test
        # (tests/e2e/test_admission_policy_apiserver.py), bound to its own namespace.
        "admissionPolicy": {"enabled": False},
    }
    values_file = real_node.work / f"values-{node_namespace}.json"
    values_file.write_text(json.dumps(values))
    kc = f"--kubeconfig={kube.kubeconfig}"
    helm(
        "install", RELEASE, str(CHART), "-n", node_namespace, "-f", str(values_file),
        "--wait", "--timeout=180s", kc,
    )  # fmt: skip
    try:
        kube.kubectl(
            "wait", "--for=condition=Available", "deployment", "-l", "app.kubernetes.io/instance=" + RELEASE,
            "-n", node_namespace, "--timeout=120s",
        )  # fmt: skip
        pods = kube.get_json("pods", "-n", node_namespace, "-l", "app.kubernetes.io/instance=" + RELEASE)
        yield ChartOperator(node_namespace, RELEASE, pods["items"][0])
    finally:
        helm("uninstall", RELEASE, "-n", node_namespace, "--wait", "--timeout=120s", kc, check=False)
