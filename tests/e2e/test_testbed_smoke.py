"""Smoke tests proving the control plane is real: the real scheduler binds pods to KWOK GPU nodes, the real
Job controller drives indexed Jobs and podFailurePolicy, real RBAC denies a restricted ServiceAccount."""

from __future__ import annotations

import ipaddress
import json

import pytest
from testbed.kube import GPU_NODES, GPUS_PER_NODE, POD_CIDR, POOL, POOL_LABEL

pytestmark = pytest.mark.e2e


def loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def container(gpus: int = 1, name: str = "trainer") -> dict:
    return {
        "name": name,
        "image": "registry.invalid/sftjob-trainer:test",
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
    }


def job(name: str, completions: int, gpus: int, annotations: dict | None = None, **spec) -> str:
    return json.dumps(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "completions": completions,
                "parallelism": completions,
                "completionMode": "Indexed",
                "backoffLimit": 0,
                "template": {
                    "metadata": {"annotations": annotations or {}},
                    "spec": {
                        "restartPolicy": "Never",
                        "nodeSelector": {POOL_LABEL: POOL},
                        "containers": [container(gpus)],
                    },
                },
                **spec,
            },
        }
    )


def pods(kube, namespace: str, selector: str) -> list[dict]:
    return kube.get_json("pods", "-n", namespace, "-l", selector)["items"]


def test_gpu_nodes_are_ready_with_loopback_addresses(kube):
    nodes = kube.get_json("nodes", "-l", f"{POOL_LABEL}={POOL}")["items"]
    assert len(nodes) == GPU_NODES
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPUS_PER_NODE)
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"
        assert all(loopback(a["address"]) for a in node["status"]["addresses"] if a["type"] == "InternalIP")


def test_scheduler_binds_deployment_pods_to_gpu_nodes(kube, namespace):
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"nodeSelector": {POOL_LABEL: POOL}, "containers": [container(gpus=4)]},
            },
        },
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    kube.kubectl("rollout", "status", "-n", namespace, "deployment/web", "--timeout=60s")
    items = pods(kube, namespace, "app=web")
    assert len(items) == 3
    for pod in items:
        assert pod["spec"]["nodeName"] in kube.nodes  # bound by kube-scheduler, not by us
        assert pod["status"]["phase"] == "Running"
        assert loopback(pod["status"]["podIP"]) and loopback(pod["status"]["hostIP"])
    events = kube.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=Scheduled").stdout
    assert "default-scheduler" in events or "Successfully assigned" in events


def test_indexed_job_completes_with_one_full_node_per_index(kube, namespace):
    # 4 indexes x 8 GPUs: exactly one index per node, so only a real GPU-aware scheduler can place them.
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=job("train", GPU_NODES, GPUS_PER_NODE))
    kube.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/train", "--timeout=90s")
    status = kube.get_json("job/train", "-n", namespace)["status"]
    assert status["succeeded"] == GPU_NODES
    assert status["completedIndexes"] == f"0-{GPU_NODES - 1}"
    items = pods(kube, namespace, "job-name=train")
    assert sorted(
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in items
    ) == [str(i) for i in range(GPU_NODES)]
    # The previous tests' pods are gone (the namespace fixture waits), so every index gets its own node.
    assert sorted(p["spec"]["nodeName"] for p in items) == sorted(kube.nodes)
    assert len({p["status"]["podIP"] for p in items}) == GPU_NODES  # unique across nodes
    for pod in items:
        assert pod["status"]["phase"] == "Succeeded"
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)
        state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert state["exitCode"] == 0


def test_plain_job_without_annotations_completes(kube, namespace):
    plain = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "plain"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container(gpus=0)]}},
        },
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(plain))
    kube.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/plain", "--timeout=60s")


def test_message_annotation_becomes_the_termination_message(kube, namespace):
    message = '{"eval_loss": 1.5}'
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job("eval", 1, 1, annotations={"kwok.sftjob.dev/message": message}),
    )
    kube.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/eval", "--timeout=60s")
    [pod] = pods(kube, namespace, "job-name=eval")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == message


def test_delay_annotation_keeps_the_pod_running(kube, namespace):
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job("slow", 1, 1, annotations={"kwok.sftjob.dev/delay": "4s"}),
    )
    kube.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=jsonpath={.status.phase}=Running",
        "pod",
        "-l",
        "job-name=slow",
        "--timeout=30s",
    )
    kube.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/slow", "--timeout=60s")
    status = kube.get_json("job/slow", "-n", namespace)["status"]
    from datetime import datetime

    took = datetime.fromisoformat(status["completionTime"]) - datetime.fromisoformat(status["startTime"])
    assert took.total_seconds() >= 4


def test_exit_code_annotation_fails_the_pod_and_matches_pod_failure_policy(kube, namespace):
    policy = {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [42]},
            }
        ]
    }
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job(
            "bad",
            1,
            1,
            annotations={"kwok.sftjob.dev/exit-code": "42"},
            backoffLimit=5,
            podFailurePolicy=policy,
        ),
    )
    kube.kubectl("wait", "-n", namespace, "--for=condition=Failed", "job/bad", "--timeout=60s")
    conditions = {c["type"]: c for c in kube.get_json("job/bad", "-n", namespace)["status"]["conditions"]}
    # FailJob despite backoffLimit 5: the Job controller matched the exit code from the pod status.
    assert conditions["Failed"]["reason"] == "PodFailurePolicy", conditions
    [pod] = pods(kube, namespace, "job-name=bad")
    assert pod["status"]["phase"] == "Failed"
    [cs] = pod["status"]["containerStatuses"]
    assert cs["name"] == "trainer"
    assert cs["state"]["terminated"]["exitCode"] == 42


@pytest.mark.parametrize(("code", "phase"), [("0", "Succeeded"), ("3", "Failed")])
def test_exit_code_annotation_on_a_bare_two_container_pod(kube, namespace, code, phase):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "annotations": {"kwok.sftjob.dev/exit-code": code, "kwok.sftjob.dev/message": f"exit {code}"},
        },
        "spec": {"restartPolicy": "Never", "containers": [container(name="a"), container(gpus=0, name="b")]},
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    kube.kubectl(
        "wait", "-n", namespace, f"--for=jsonpath={{.status.phase}}={phase}", "pod/p", "--timeout=30s"
    )
    statuses = kube.get_json("pod/p", "-n", namespace)["status"]["containerStatuses"]
    assert sorted(c["name"] for c in statuses) == ["a", "b"]
    assert all(c["state"]["terminated"]["exitCode"] == int(code) for c in statuses)
    assert all(c["state"]["terminated"]["message"] == f"exit {code}" for c in statuses)


def test_garbage_collector_deletes_the_pods_of_a_deleted_job(kube, namespace):
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job("long", 2, 1, annotations={"kwok.sftjob.dev/delay": "10m"}),
    )
    kube.kubectl(
        "wait", "-n", namespace, "--for=jsonpath={.status.phase}=Running", "pod", "-l", "job-name=long",
        "--timeout=30s",
    )  # fmt: skip
    assert len(pods(kube, namespace, "job-name=long")) == 2
    kube.kubectl("delete", "-n", namespace, "job/long", "--cascade=background")
    kube.kubectl("wait", "-n", namespace, "--for=delete", "pod", "-l", "job-name=long", "--timeout=30s")
    assert pods(kube, namespace, "job-name=long") == []


def test_too_many_gpus_stays_pending_unschedulable(kube, namespace):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "greedy"},
        "spec": {"containers": [container(gpus=GPUS_PER_NODE + 1)]},
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    kube.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=jsonpath={.status.conditions[0].reason}=Unschedulable",
        "pod/greedy",
        "--timeout=30s",
    )
    status = kube.get_json("pod/greedy", "-n", namespace)["status"]
    assert status["phase"] == "Pending"
    [scheduled] = [c for c in status["conditions"] if c["type"] == "PodScheduled"]
    assert "nvidia.com/gpu" in scheduled["message"]


def test_rbac_denies_a_restricted_service_account_and_allows_its_role(kube, namespace):
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }
    kubeconfig = kube.sa_kubeconfig(namespace, "reader")

    def can_i(*args: str) -> str:
        r = kube.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        return r.stdout.strip()

    assert can_i("list", "pods", "-n", namespace) == "no"  # nothing granted yet
    for obj in (role, binding):
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))
    assert can_i("list", "pods", "-n", namespace) == "yes"
    assert can_i("create", "pods", "-n", namespace) == "no"
    assert can_i("list", "secrets", "-n", namespace) == "no"
    assert can_i("list", "pods", "-n", "default") == "no"
    assert kube.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig).returncode == 0
    denied = kube.kubectl("get", "secrets", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    whoami = kube.kubectl(
        "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kubeconfig
    )
    assert whoami.stdout == f"system:serviceaccount:{namespace}:reader"


def test_python_api_client_talks_to_the_same_cluster(kube, namespace):
    from kubernetes import client

    with kube.api_client() as api:
        names = [n.metadata.name for n in client.CoreV1Api(api).list_node().items]
        assert sorted(names) == sorted(kube.nodes)
        ns = client.CoreV1Api(api).read_namespace(namespace)
        assert ns.status.phase == "Active"
