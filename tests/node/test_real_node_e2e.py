"""The whole path on real containers: `helm install` the chart with the locally built images, `kubectl apply`
an SFTJob, and two trainer pods rendezvous through the headless Service's DNS names, train with 2-rank
ZeRO-3 on gloo, checkpoint to S3; then the eval and merge pods run and the run Succeeds. Also what a real
kubelet adds: a deleted trainer pod, SIGTERM on suspend, an image that cannot be pulled.

Real: kubelet, containerd/runc, CNI, kube-proxy, CoreDNS, both images, SeaweedFS, Prometheus. Simulated:
GPUs (gpusPerNode: 0, the CPU path), multi-host networking (one node; the pods share its bridge).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from testbed.node import BRIDGE, NODE_SELECTOR, POD_SUBNET, ROUTE_TABLE, TOLERATIONS, RealNode
from testbed.operator_e2e import load
from testbed.procs import wait_until

from .conftest import S3_SECRET, ChartOperator, PodS3

# The operator e2e tests' SFTJob helpers: status(kube, ns, name), condition(status, type), pods(kube, ns, sel).
_e2e = load()
status, condition, pods = _e2e.status, _e2e.condition, _e2e.pods

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]

GROUP = "sft.tuning.dev"


@pytest.fixture(scope="module")
def inputs(pod_s3: PodS3, tiny_model_dir: str) -> str:
    """The tiny model and an alpaca data set in the bucket; returns the s3:// prefix."""
    from trainer.tiny import dataset_rows

    client, bucket = pod_s3.bucket.client(), pod_s3.bucket.bucket
    for f in sorted(Path(tiny_model_dir).iterdir()):
        client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    for name, n, seed in (("train", 400, 1), ("eval", 12, 2)):
        body = "".join(json.dumps(r) + "\n" for r in dataset_rows(n, seed=seed))
        client.put_object(Bucket=bucket, Key=f"data/{name}.jsonl", Body=body.encode())
    return f"s3://{bucket}"


def sftjob(name: str, prefix: str, endpoint: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": f"{prefix}/models/tiny"},
        "dataset": {
            "train": [f"{prefix}/data/train.jsonl"],
            "eval": [f"{prefix}/data/eval.jsonl"],
            "format": "alpaca",
            "maxSeqLength": 96,
        },
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {
            "maxSteps": 24,
            "learningRate": 3e-3,
            "globalBatchSize": 4,  # micro 1 x 2 ranks x accumulation 2
            "microBatchSize": 1,
            "gradientCheckpointing": False,
            "checkpointSteps": 4,
        },
        "resources": {
            "nodes": 2,
            "gpusPerNode": 0,
            "cpu": "900m",  # 2 ranks + the operator (100m) fit 2 cores; at 250m a rank crawled
            "memory": "3Gi",
            "shmSize": "512Mi",
            "nodeSelector": NODE_SELECTOR,
            "tolerations": TOLERATIONS,
        },
        "output": {
            "uri": f"{prefix}/runs",
            "endpoint": endpoint,
            "pathStyle": True,
            "region": "us-east-1",
            "credentialsSecret": {"name": S3_SECRET},
        },
        "eval": {"maxSamples": 8, "maxNewTokens": 8},
        "merge": {"dtype": "float32"},
        "runPolicy": {"stuckPendingTimeoutSeconds": 30},
    }
    for key, value in over.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "SFTJob", "metadata": {"name": name}, "spec": spec}


def apply_sftjob(kube: Any, ns: str, name: str, prefix: str, endpoint: str, **over: Any) -> None:
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(sftjob(name, prefix, endpoint, **over)))


def wait_status(kube: Any, ns: str, name: str, check: Any, timeout: float, what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = status(kube, ns, name)
        if st.get("phase") == "Failed" and "Failed" not in what:
            raise AssertionError(f"{name} Failed: {json.dumps(st, indent=1)}")
        return st if check(st) else None

    try:
        return wait_until(probe, timeout, f"{name}: {what}", interval=1.0)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nstatus: {json.dumps(status(kube, ns, name), indent=1)}") from e


def logs(kube: Any, ns: str, pod: str) -> str:
    return kube.kubectl("logs", "-n", ns, pod, check=False).stdout


def json_lines(text: str) -> list[dict[str, Any]]:
    """The trainer's JSON log events in a pod's log."""
    return [json.loads(x) for x in text.splitlines() if x.startswith("{") and '"event"' in x]


def printed_rows(table: str) -> list[dict[str, str]]:
    """`kubectl get` output as dicts, cut at the header's column starts (cells may be empty)."""
    header, *rows = table.splitlines()
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    cut = [*starts[1:], None]
    return [{n: row[a:b].strip() for n, a, b in zip(names, starts, cut, strict=True)} for row in rows]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---- the node itself -------------------------------------------------------------------------------------


def test_pod_traffic_cannot_leave_the_machine(real_node: RealNode) -> None:
    """Checked by inspecting the configuration, never by sending traffic out: whatever arrives from the bridge
    and is not for this machine meets an `unreachable` route; the CNI adds no NAT; DNS never forwards."""
    rules = subprocess.run(["ip", "rule", "show"], capture_output=True, text=True, check=True).stdout
    assert f"iif {BRIDGE} lookup {ROUTE_TABLE}" in rules, rules
    out = subprocess.run(
        ["ip", "route", "show", "table", ROUTE_TABLE], capture_output=True, text=True, check=True
    )
    table = [line.strip() for line in out.stdout.splitlines()]
    assert sorted(table) == sorted([f"{POD_SUBNET} dev {BRIDGE} scope link", "unreachable default"]), table
    route = subprocess.run(
        ["ip", "route", "get", "192.0.2.1", "from", "10.234.0.77", "iif", BRIDGE],
        capture_output=True,
        text=True,
    )
    assert route.returncode != 0 and "no route to host" in route.stderr.lower(), (route.stdout, route.stderr)
    conf = json.loads(next((real_node.run_dir / "cni").glob("*.conflist")).read_text())
    bridge = conf["plugins"][0]
    assert (bridge["isGateway"], bridge["ipMasq"]) == (False, False)
    corefile = (real_node.run_dir / "Corefile").read_text()
    assert "forward" not in corefile and "rcode NXDOMAIN" in corefile


def test_images_run_non_root_with_a_read_only_root(
    kube: Any, real_node: RealNode, node_namespace: str
) -> None:
    """Each image, with runAsNonRoot and no runAsUser (the kubelet checks the image's own USER) and a
    read-only root filesystem: the process is not root and cannot write outside its volumes."""
    probe = "import os, sys\ntry:\n open('/probe', 'w')\nexcept OSError as e:\n print('uid', os.getuid(), e.strerror)"
    for role, image in (("operator", real_node.images.operator), ("trainer", real_node.images.trainer)):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"probe-{role}", "namespace": node_namespace},
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": NODE_SELECTOR,
                "tolerations": TOLERATIONS,
                "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [
                    {
                        "name": "probe",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": ["python3", "-c", probe],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
        kube.kubectl("apply", "-f", "-", input=json.dumps(pod))
        kube.kubectl(
            "wait", "--for=jsonpath={.status.phase}=Succeeded", f"pod/probe-{role}", "-n", node_namespace,
            "--timeout=120s",
        )  # fmt: skip
        out = logs(kube, node_namespace, f"probe-{role}").split()
        assert out[:2] == ["uid", "10001" if role == "operator" else "1000"], out
        assert "Read-only" in " ".join(out), out


# ---- the whole path ------------------------------------------------------------------------------------------


def test_helm_install_to_succeeded(
    kube: Any, real_node: RealNode, chart_operator: ChartOperator, pod_s3: PodS3, inputs: str, prometheus: Any
) -> None:
    ns = chart_operator.namespace
    # The operator pod runs from its image with in-cluster config; the real Prometheus scrapes it.
    op_ip = chart_operator.pod["status"]["podIP"]
    prometheus.add_target("sftjob-operator", f"{op_ip}:8080")
    wait_until(
        lambda: prometheus.query('up{job="sftjob-operator"} == 1'), 60, "Prometheus scraping the operator pod"
    )

    # with dataset.curation: a curate pod first, then the training ranks read their own shards of its output
    apply_sftjob(
        kube, ns, "whole-path", inputs, pod_s3.endpoint, dataset={"curation": {"nearDuplicates": {}}}
    )
    seen: list[dict[str, str]] = []

    def training_with_loss(st: dict[str, Any]) -> bool:
        seen.extend(printed_rows(kube.kubectl("get", "sft", "whole-path", "-n", ns).stdout))
        progress = st.get("progress") or {}
        return (
            st.get("phase") == "Training" and progress.get("loss") is not None and progress.get("step", 0) > 0
        )

    wait_status(kube, ns, "whole-path", training_with_loss, 600, "Training with progress and loss")
    # What a user watching `kubectl get sft` saw on the way: Training, with progress and a loss.
    assert any(r["PHASE"] == "Training" and r["PROGRESS"] and _is_float(r["LOSS"]) for r in seen), seen

    # Both ranks are real pods, named by the headless Service (rank 1 resolved rank 0's DNS name).
    train = pods(kube, ns, "sft.tuning.dev/stage=train")
    assert len(train) == 2 and all(p["spec"]["nodeName"] == real_node.name for p in train)

    r = kube.kubectl(
        "wait", "--for=condition=Succeeded", "sftjob/whole-path", "-n", ns, "--timeout=900s", check=False,
        timeout=960,
    )  # fmt: skip
    st = status(kube, ns, "whole-path")
    assert r.returncode == 0, json.dumps(st, indent=1)
    assert st["phase"] == "Succeeded"
    done = st["progress"]
    assert done["step"] == done["totalSteps"] and done["percent"] == 100, done  # not the last step read
    # Curated first, by a pod with no GPU that finished before the training pods started; each training
    # rank read only its own shard of what it wrote.
    [curate] = pods(kube, ns, "sft.tuning.dev/stage=curate")
    assert curate["spec"]["nodeName"] == real_node.name
    assert "nvidia.com/gpu" not in (curate["spec"]["containers"][0]["resources"].get("limits") or {})
    curated_at = curate["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    assert all(p["metadata"]["creationTimestamp"] >= curated_at for p in train), (curated_at, train)
    assert any(c["type"] == "Curated" and c["status"] == "True" for c in st["conditions"]), st["conditions"]
    [curated] = [e for e in json_lines(logs(kube, ns, curate["metadata"]["name"])) if e["event"] == "curated"]
    for p in train:
        rank = int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
        [fetched] = [
            e for e in json_lines(logs(kube, ns, p["metadata"]["name"])) if e["event"] == "data_fetched"
        ]
        assert fetched["keys"] == [f"{curated['curated_key']}/shards/{curated['shards']}/rank-{rank}.npz"]
    assert st["data"]["contentHash"] == curated["content_hash"] and st["data"]["reused"] is False, st["data"]

    # Eval results came from the eval pod's termination message: `{"evalResults": {...}}`.
    assert st.get("evalResults", {}).get("evalLoss") is not None, st
    eval_pod = pods(kube, ns, "sft.tuning.dev/stage=eval")[0]
    message = eval_pod["status"]["containerStatuses"][0]["state"]["terminated"].get("message", "")
    assert json.loads(message)["evalResults"]["evalLoss"] == pytest.approx(st["evalResults"]["evalLoss"])

    # The manifest in S3 verifies (every artifact present with its recorded size and hash).
    from sftjob_api.manifest import verify_manifest
    from sftjob_api.storage import S3Store

    store = S3Store(st["artifacts"]["manifest"].rsplit("/", 1)[0], pod_s3.bucket.client())
    assert verify_manifest(store) == []

    # The S3 credentials (from the Secret, through secretKeyRef) appear in no pod's log (issue 14, part 7).
    b = pod_s3.bucket
    for pod in [*pods(kube, ns, "sft.tuning.dev/job-name=whole-path"), chart_operator.pod]:
        text = logs(kube, ns, pod["metadata"]["name"])
        assert b.secret_key not in text and b.access_key not in text, (
            f"a credential in {pod['metadata']['name']}"
        )


def test_deleted_trainer_pod_resumes_from_checkpoint(
    kube: Any, real_node: RealNode, chart_operator: ChartOperator, pod_s3: PodS3, inputs: str
) -> None:
    ns, name = chart_operator.namespace, "resilient"
    apply_sftjob(
        kube,
        ns,
        name,
        inputs,
        pod_s3.endpoint,
        training={"maxSteps": 120, "checkpointSteps": 10},
        merge={"enabled": False},
    )
    st = wait_status(
        kube, ns, name, lambda s: (s.get("progress") or {}).get("step", 0) >= 25, 600, "step 25 reached"
    )
    step_at_kill = st["progress"]["step"]
    victim = next(
        p for p in pods(kube, ns, "sft.tuning.dev/stage=train") if p["status"].get("phase") == "Running"
    )
    kube.kubectl("delete", "pod", victim["metadata"]["name"], "-n", ns, "--wait=false")

    # A new pod of the same index runs and the trainer resumes from the newest complete checkpoint
    # (rank 0 logs {"event": "resumed", "step": N}).
    def resumed_from() -> int | None:
        for p in pods(kube, ns, "sft.tuning.dev/stage=train"):
            for line in logs(kube, ns, p["metadata"]["name"]).splitlines():
                if line.startswith("{") and '"resumed"' in line:
                    return int(json.loads(line)["step"])
        return None

    resumed = wait_until(resumed_from, 600, "a trainer pod resuming from a checkpoint", interval=2.0)
    assert step_at_kill - resumed <= 10 + 2, (step_at_kill, resumed)  # lost <= checkpoint interval (+ lag)
    wait_status(kube, ns, name, lambda s: s.get("phase") == "Succeeded", 900, "Succeeded after the restart")


def test_suspend_checkpoints_on_sigterm_then_resumes(
    kube: Any, chart_operator: ChartOperator, pod_s3: PodS3, inputs: str
) -> None:
    ns, name = chart_operator.namespace, "suspended"
    apply_sftjob(
        kube, ns, name, inputs, pod_s3.endpoint,
        training={"maxSteps": 200, "checkpointSteps": 1000}, merge={"enabled": False}, eval={"enabled": False},
    )  # fmt: skip
    wait_status(
        kube, ns, name, lambda s: (s.get("progress") or {}).get("step", 0) >= 5, 600, "step 5 reached"
    )
    kube.kubectl("patch", "sftjob", name, "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    st = wait_status(kube, ns, name, lambda s: s.get("phase") == "Suspended", 300, "Suspended")
    # checkpointSteps is 1000: only the SIGTERM handler can have written a checkpoint.
    client, bucket = pod_s3.bucket.client(), pod_s3.bucket.bucket
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{ns}/{name}/checkpoints/").get(
            "Contents", []
        )
    ]
    assert any(k.endswith("COMPLETE") for k in keys), (keys, st)
    kube.kubectl("patch", "sftjob", name, "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_status(kube, ns, name, lambda s: s.get("phase") == "Succeeded", 900, "Succeeded after unsuspend")


def test_unpullable_image_is_stuck_with_the_cause(
    kube: Any, chart_operator: ChartOperator, pod_s3: PodS3, inputs: str
) -> None:
    ns, name = chart_operator.namespace, "bad-image"
    apply_sftjob(
        kube, ns, name, inputs, pod_s3.endpoint,
        resources={"image": "localhost/sftjob-no-such-image:0", "cpu": "100m"},  # never starts: leave room
    )  # fmt: skip
    st = wait_status(
        kube, ns, name, lambda s: condition(s, "Stuck").get("status") == "True", 180, "Stuck condition"
    )
    stuck = condition(st, "Stuck")
    assert "ImagePull" in stuck.get("reason", "") + stuck.get("message", ""), stuck
    kube.kubectl("delete", "sftjob", name, "-n", ns, "--wait=false")


def test_missing_or_incomplete_secret_is_stuck_naming_it(
    kube: Any, chart_operator: ChartOperator, pod_s3: PodS3, inputs: str
) -> None:
    """The kubelet cannot start a pod whose secretKeyRef names a missing Secret or key: the SFTJob is Stuck
    with that cause, naming the Secret and spec.output.credentialsSecret (issue 14, part 7)."""
    ns = chart_operator.namespace
    kube.kubectl(
        "create", "secret", "generic", "s3-half", "-n", ns, "--from-literal=AWS_ACCESS_KEY_ID=only-the-id"
    )
    cases = {
        "no-secret": ("s3-nowhere", 's3-nowhere" not found'),
        "half-secret": ("s3-half", "AWS_SECRET_ACCESS_KEY"),
    }
    for name, (secret, _) in cases.items():
        apply_sftjob(
            kube, ns, name, inputs, pod_s3.endpoint,
            output={"credentialsSecret": {"name": secret}},
            resources={"cpu": "100m"},  # never start: both groups' pods must fit beside each other
        )  # fmt: skip
    for name, (_, said) in cases.items():
        st = wait_status(
            kube, ns, name, lambda s: condition(s, "Stuck").get("status") == "True", 180, "Stuck condition"
        )
        stuck = condition(st, "Stuck")
        assert stuck.get("reason") == "CreateContainerConfigError", stuck
        assert said in stuck["message"] and "spec.output.credentialsSecret" in stuck["message"], stuck
        kube.kubectl("delete", "sftjob", name, "-n", ns, "--wait=false")
