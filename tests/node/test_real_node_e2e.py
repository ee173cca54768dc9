"""The whole path on real containers: `helm install` the chart with the locally built images, `kubectl apply`
the README's SmolLM2 task (examples/sftjob-smollm2.yaml, data in S3, curation on) as two trainer pods that
rendezvous through the headless Service's DNS names and train with 2-rank ZeRO-3 on gloo; then the eval and
merge pods run and the run Succeeds. One run (tests/node/readme_run.py) is watched the way a user and a
cluster's Prometheus watch it, and every test of it asserts on that one run: the model learned (eval stage's
numbers vs the base model), the merged model answers in the requested shape, the manifest verifies, the
pods are discovered from the apiserver and every dashboard panel and alert rule works on their data,
`kubectl get sft` / `sftjob status|logs|artifacts` say what happened. Also what a real kubelet adds (tiny
model, tests/node/toy.py): a deleted trainer pod, SIGTERM on suspend and a resume on fewer nodes, an image
that cannot be pulled.

Real: kubelet, containerd/runc, CNI, kube-proxy, CoreDNS, both images, SeaweedFS, Prometheus. Simulated:
GPUs (gpusPerNode: 0, the CPU path), multi-host networking (one node; the pods share its bridge).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from testbed.node import BRIDGE, NODE_SELECTOR, POD_SUBNET, ROUTE_TABLE, TOLERATIONS, RealNode
from testbed.procs import wait_until

from .conftest import S3_SECRET, ChartOperator, PodS3
from .readme_run import DATA, NAME, PHASES, ReadmeRun, json_lines, run_readme_task, upload_data
from .toy import (
    KILL_AT_STEP,
    RESIZED_EVAL_RTOL,
    TOY_GATES,
    TOY_STEPS,
    ToyRun,
    _is_float,
    apply_sftjob,
    assert_passes_the_gate,
    condition,
    eval_results,
    logs,
    pods,
    status,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer]

INDEX = "batch.kubernetes.io/job-completion-index"
# The first test using readme_run pays for the whole run (its fixture): more than the suite's 900 s default.
README_TIMEOUT = pytest.mark.timeout(1800)


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


# ---- the whole path: the README's task, watched as a user and a cluster's Prometheus watch it -------------


@pytest.fixture(scope="module")
def readme_run(kube: Any, chart_operator: ChartOperator, pod_s3: PodS3, prometheus: Any) -> ReadmeRun:
    """One run of examples/sftjob-smollm2.yaml through the chart's operator, shared by the tests below."""
    client, bucket = pod_s3.bucket.client(), pod_s3.bucket.bucket
    upload_data(client, bucket)
    ns = chart_operator.namespace
    run = run_readme_task(
        kube, prometheus, ns, chart_operator.release, f"s3://{bucket}", pod_s3.endpoint, S3_SECRET, 1500
    )
    print(f"\n{NAME} on the real node: first seen {run.first_seen}; wall s per phase {run.times()}")
    return run


def cli(kube: Any, ns: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """The `sftjob` command (the kubectl-sft plugin is the same entry point), as a user runs it."""
    argv = [
        sys.executable,
        "-m",
        "sftjob_operator.cli",
        *args,
        NAME,
        "-n",
        ns,
        f"--kubeconfig={kube.kubeconfig}",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, **kw)


@pytest.fixture(scope="module")
def downloaded(kube: Any, readme_run: ReadmeRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sftjob artifacts NAME --download DIR`: every artifact, each checked against manifest.json."""
    dest = tmp_path_factory.mktemp("artifacts")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the Secret, read via kubeconfig
    r = cli(kube, readme_run.namespace, "artifacts", "--download", str(dest), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every file matches manifest.json" in r.stdout, r.stdout
    return dest


@README_TIMEOUT
def test_the_readme_task_learns_on_two_zero3_ranks(readme_run: ReadmeRun, downloaded: Path) -> None:
    st = readme_run.status
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    # Both ranks are real pods on the real node, one ZeRO-3 group (DeepSpeed on gloo) over the Service.
    train = [p for p in readme_run.pods if p["metadata"]["labels"].get("sft.tuning.dev/stage") == "train"]
    assert sorted(p["metadata"]["annotations"][INDEX] for p in train) == ["0", "1"]
    assert all(p["spec"]["nodeName"] for p in train)
    limits = train[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == "900m" and limits["memory"] == "6Gi", limits
    # The eval stage's numbers: the fine-tuned model in status.evalResults, the base model beside it in
    # eval/results.json (both computed by the eval pod on the same held-out rows).
    results = json.loads((downloaded / "eval" / "results.json").read_text())
    base, tuned = results["base"], results["trained"]
    print(f"\nheld-out: base {base}\nfine-tuned {tuned}")
    assert st["evalResults"]["exactMatch"] == pytest.approx(tuned["exact_match"])
    assert st["evalResults"]["evalLoss"] == pytest.approx(tuned["eval_loss"])
    assert tuned["exact_match"] - base["exact_match"] >= 0.30, results
    assert tuned["eval_loss"] <= 0.5 * base["eval_loss"], results
    assert st["evalResults"]["gatesPassed"] is True
    # the eval pod wrote them as its termination message: `{"evalResults": {...}}`
    [eval_pod] = [p for p in readme_run.pods if p["metadata"]["labels"].get("sft.tuning.dev/stage") == "eval"]
    message = eval_pod["status"]["containerStatuses"][0]["state"]["terminated"].get("message", "")
    assert json.loads(message)["evalResults"]["evalLoss"] == pytest.approx(tuned["eval_loss"])


@README_TIMEOUT
def test_the_merged_model_answers_in_the_requested_shape(readme_run: ReadmeRun, downloaded: Path) -> None:
    """Plain transformers, no peft, no trainer code: load merged/ and ask a held-out question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = downloaded / "merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    row = json.loads((DATA / "contacts-eval.jsonl").read_text().splitlines()[-1])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=48, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert set(json.loads(answer)) == set(json.loads(row["output"])), answer


@README_TIMEOUT
def test_the_adapter_is_handed_to_vllm(readme_run: ReadmeRun, downloaded: Path) -> None:
    """The example's `output.serving: vllm`: serving/serving.json names what vLLM serves, with this run's
    S3 URIs and eval numbers, and vLLM's rules accept the adapter (docs/serving.md)."""
    from sftjob_api import Layout
    from sftjob_api.manifest import SERVING_MOUNT
    from sftjob_api.serving import adapter_config_problems

    serving = json.loads((downloaded / Layout.SERVING_MANIFEST).read_text())
    adapter = json.loads((downloaded / "adapter" / "adapter_config.json").read_text())
    root = readme_run.status["artifacts"]["root"].rstrip("/") + "/"
    assert adapter["base_model_name_or_path"] == "smollm2-135m-instruct"  # the spec's name, not a cache path
    assert adapter_config_problems("vllm", adapter) == []
    assert (serving["server"], serving["artifact"], serving["message"]) == ("vllm", "adapter", "")
    assert serving["uri"] == serving["adapter"]["uri"] == root + "adapter/"
    assert serving["merged"]["uri"] == root + "merged/" and serving["adapterChecks"] == []
    assert serving["baseModel"] == {"uri": "smollm2-135m-instruct", "revision": None}
    assert "<|im_start|>" in serving["chatTemplate"] and serving["maxModelLen"] == 256
    results = json.loads((downloaded / "eval" / "results.json").read_text())
    assert serving["eval"] == {"trained": results["trained"], "base": results["base"]}
    args = serving["vllm"]["args"]
    assert args[:3] == ["vllm", "serve", "smollm2-135m-instruct"]
    assert args[args.index("--lora-modules") + 1] == f"{NAME}={SERVING_MOUNT}/adapter"
    assert args[args.index("--max-lora-rank") + 1] == "16"


@README_TIMEOUT
def test_curated_first_then_each_rank_reads_its_shard(readme_run: ReadmeRun) -> None:
    st, pods_of = readme_run.status, readme_run.pods
    [curate] = [p for p in pods_of if p["metadata"]["labels"].get("sft.tuning.dev/stage") == "curate"]
    train = [p for p in pods_of if p["metadata"]["labels"].get("sft.tuning.dev/stage") == "train"]
    assert "nvidia.com/gpu" not in (curate["spec"]["containers"][0]["resources"].get("limits") or {})
    curated_at = curate["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    assert all(p["metadata"]["creationTimestamp"] >= curated_at for p in train), (curated_at, train)
    assert any(c["type"] == "Curated" and c["status"] == "True" for c in st["conditions"]), st["conditions"]
    [curated] = [
        e for e in json_lines(readme_run.logs[curate["metadata"]["name"]]) if e["event"] == "curated"
    ]
    for p in train:
        rank = int(p["metadata"]["annotations"][INDEX])
        [fetched] = [
            e for e in json_lines(readme_run.logs[p["metadata"]["name"]]) if e["event"] == "data_fetched"
        ]
        assert fetched["keys"] == [f"{curated['curated_key']}/shards/{curated['shards']}/rank-{rank}.npz"]
    assert st["data"]["contentHash"] == curated["content_hash"] and st["data"]["reused"] is False, st["data"]
    assert st["data"]["dropped"] == {"duplicate": 1}, st["data"]  # the row uploaded twice


@README_TIMEOUT
def test_manifest_verifies_and_no_log_holds_a_credential(
    readme_run: ReadmeRun, chart_operator: ChartOperator, pod_s3: PodS3, kube: Any
) -> None:
    from sftjob_api.manifest import verify_manifest
    from sftjob_api.storage import S3Store

    st = readme_run.status
    store = S3Store(st["artifacts"]["manifest"].rsplit("/", 1)[0], pod_s3.bucket.client())
    assert verify_manifest(store) == []
    # The S3 credentials (from the Secret, through secretKeyRef) appear in no pod's log (issue 14, part 7).
    b = pod_s3.bucket
    op_log = logs(kube, chart_operator.namespace, chart_operator.pod["metadata"]["name"])
    for name, text in [*readme_run.logs.items(), ("operator", op_log)]:
        assert b.secret_key not in text and b.access_key not in text, f"a credential in {name}"


@README_TIMEOUT
def test_prometheus_discovers_the_pods_and_every_panel_and_rule_works(readme_run: ReadmeRun) -> None:
    run = readme_run
    # Found through the apiserver by the chart's PodMonitor (both ranks) and ServiceMonitor (the operator).
    assert sorted(t["metric"]["pod"].rsplit("-", 1)[0] for t in run.trainer_targets) == [
        f"{NAME}-train-0",
        f"{NAME}-train-1",
    ], run.trainer_targets
    assert all(t["value"][1] == "1" for t in run.trainer_targets), run.trainer_targets
    assert len(run.operator_up) == 1, run.operator_up
    assert run.panels_checked >= 20 and not run.panels_without_data, run.panels_without_data
    # Every shipped rule evaluates on this data without error, and the one made to fire fired.
    assert run.rules and all(r["health"] == "ok" for r in run.rules), run.rules
    assert {r["name"] for r in run.rules} >= {"SFTJobFailed", "SFTJobTrainingStalled", "SFTJobOperatorDown"}
    assert {r["name"]: r.get("state") for r in run.rules}["SFTJobOperatorDown"] == "inactive"
    [fired] = run.fired
    assert fired["labels"]["namespace"] == run.namespace and fired["labels"]["severity"] == "warning", fired
    assert run.doomed_final.get("phase") == "Failed" and run.doomed_final.get("reason") == "Stuck"


@README_TIMEOUT
def test_an_unschedulable_rank_is_said_at_once(readme_run: ReadmeRun) -> None:
    """The second SFTJob asks for 4 cores: the scheduler's message is a condition before Stuck's timeout."""
    early = readme_run.doomed_early
    assert early, "the Unschedulable condition was never seen before the run ended"
    said = next(c for c in early["conditions"] if c["type"] == "Unschedulable")
    assert "Insufficient cpu" in said["message"] and "train rank 0" in said["message"], said
    assert not [c for c in early["conditions"] if c["type"] == "Stuck" and c["status"] == "True"], early
    stuck = next(c for c in readme_run.doomed_final["conditions"] if c["type"] == "Stuck")
    assert stuck["reason"] == "Unschedulable" and "Insufficient cpu" in stuck["message"], stuck


@README_TIMEOUT
def test_the_users_view_of_the_same_run(kube: Any, readme_run: ReadmeRun) -> None:
    run, ns = readme_run, readme_run.namespace
    # `kubectl get sft` during the run: the phases in order, then progress and loss, never a made-up zero.
    assert set(PHASES) <= set(run.first_seen), run.first_seen
    assert list(PHASES) == sorted(PHASES, key=run.first_seen.__getitem__), run.first_seen
    training = [r for r in run.rows if r["PHASE"] == "Training"]
    measured = [r for r in training if re.fullmatch(r"\d+/12 \([0-9.]+%\)", r["PROGRESS"])]
    assert measured and all(_is_float(r["LOSS"]) and r["ETA"] for r in measured), training
    unmeasured = [r for r in training if r not in measured]
    assert all(
        (r["PROGRESS"], r["LOSS"], r["ETA"]) in {("", "", ""), ("Restarting", "", "")} for r in unmeasured
    )
    made_up = [
        r for r in run.rows if r["LOSS"] in ("0", "0.0") or (r["ETA"] == "0s" and r["PROGRESS"][:3] != "12/")
    ]
    assert not made_up, run.rows
    assert run.rows[-1]["PROGRESS"] == "12/12 (100%)" and run.rows[-1]["PHASE"] == "Succeeded"

    status = cli(kube, ns, "status")
    assert status.returncode == 0, status.stderr
    assert f"{ns}/{NAME}: Succeeded" in status.stdout and "step 12/12 (100%)" in status.stdout, status.stdout
    em = run.status["evalResults"]["exactMatch"]
    assert re.search(rf"exactMatch\s+{em:.4g}", status.stdout), status.stdout
    assert re.search(r"Merged\s+True\s+MergeCompleted", status.stdout), status.stdout

    rank1 = cli(kube, ns, "logs", "--stage", "train", "--rank", "1")
    assert rank1.returncode == 0 and f"==> pod {NAME}-train-1-" in rank1.stderr, rank1.stderr
    [fetched] = [e for e in json_lines(rank1.stdout) if e["event"] == "data_fetched"]
    assert fetched["keys"][0].endswith("/rank-1.npz"), fetched


# ---- recoveries of the toy spec: a deleted pod at the same size, a suspend and a resize to 1 node ---------


@pytest.fixture(scope="module")
def unresized_run(
    kube: Any, real_node: RealNode, chart_operator: ChartOperator, pod_s3: PodS3, inputs: str
) -> ToyRun:
    """A 2-pod run whose trainer pod is deleted at step 20 or later, through to Succeeded: the deletion test's
    run, and the reference the resized run is compared with (whichever test asks first pays for it)."""
    ns, name = chart_operator.namespace, "resilient"
    apply_sftjob(
        kube, ns, name, inputs, pod_s3.endpoint,
        training={"maxSteps": TOY_STEPS, "checkpointSteps": 10}, eval={"gates": TOY_GATES},
        merge={"enabled": False},
    )  # fmt: skip
    st = wait_status(
        kube,
        ns,
        name,
        lambda s: (s.get("progress") or {}).get("step", 0) >= KILL_AT_STEP,
        600,
        "the kill's step",
    )
    step_at_kill = st["progress"]["step"]
    victim = next(
        p for p in pods(kube, ns, "sft.tuning.dev/stage=train") if p["status"].get("phase") == "Running"
    )
    kube.kubectl("delete", "pod", victim["metadata"]["name"], "-n", ns, "--wait=false")

    # A new pod of the same index runs and the trainer resumes from the newest complete checkpoint
    # (rank 0 logs {"event": "resumed", "step": N}); -1: training ended first (the kill came too late).
    def resumed_from() -> int | None:
        for p in pods(kube, ns, "sft.tuning.dev/stage=train"):
            for line in logs(kube, ns, p["metadata"]["name"]).splitlines():
                if line.startswith("{") and '"resumed"' in line:
                    return int(json.loads(line)["step"])
        return -1 if status(kube, ns, name).get("phase") in ("Evaluating", "Succeeded", "Failed") else None

    resumed = wait_until(resumed_from, 600, "a trainer pod resuming from a checkpoint", interval=2.0)
    assert resumed >= 0, f"training ended before the kill of step {step_at_kill} landed"
    st = wait_status(
        kube, ns, name, lambda s: s.get("phase") == "Succeeded", 900, "Succeeded after the restart"
    )
    run = ToyRun(st, eval_results(pod_s3, ns, name), step_at_kill, resumed)
    print(
        f"\n{name}: killed at step {step_at_kill}, resumed from {resumed}; eval loss "
        f"{run.results['trained']['eval_loss']} (base {run.results['base']['eval_loss']})"
    )
    return run


def test_deleted_trainer_pod_resumes_from_checkpoint(unresized_run: ToyRun) -> None:
    run = unresized_run
    assert run.step_at_kill - run.resumed <= 10 + 2, run  # lost <= checkpoint interval (+ lag)
    assert_passes_the_gate(run)


def test_suspended_run_resumes_on_fewer_nodes(
    kube: Any, chart_operator: ChartOperator, pod_s3: PodS3, inputs: str, unresized_run: ToyRun
) -> None:
    """Suspend writes a checkpoint from the SIGTERM handler alone (checkpointSteps is 1000); while Suspended the
    run is patched from 2 nodes to 1 (docs/recovery.md, "An edited size"); resumed, one pod continues the
    2-rank checkpoint at world size 1 (adapter checkpoints load at any size), evaluates and Succeeds; its
    adapter passes the same gate as the run that stayed at 2 pods, with the same eval loss. Prints the resume
    time at the new size (unsuspend -> first step)."""
    ns, name = chart_operator.namespace, "suspended"
    apply_sftjob(
        kube, ns, name, inputs, pod_s3.endpoint,
        training={"maxSteps": TOY_STEPS, "checkpointSteps": 1000}, eval={"gates": TOY_GATES},
        merge={"enabled": False},
    )  # fmt: skip
    wait_status(
        kube, ns, name, lambda s: (s.get("progress") or {}).get("step", 0) >= 5, 600, "step 5 reached"
    )
    kube.kubectl("patch", "sftjob", name, "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    st = wait_status(kube, ns, name, lambda s: s.get("phase") == "Suspended", 300, "Suspended")
    client, bucket = pod_s3.bucket.client(), pod_s3.bucket.bucket
    prefix = f"runs/{ns}/{name}/checkpoints/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    saved = [int(m[1]) for k in keys if (m := re.search(r"/step-(\d+)/COMPLETE$", k))]
    assert len(saved) == 1, (keys, st)  # only the SIGTERM handler can have written it

    kube.kubectl(
        "patch", "sftjob", name, "-n", ns, "--type=merge", "-p", '{"spec":{"resources":{"nodes":1}}}'
    )
    t_resume = time.time()
    kube.kubectl("patch", "sftjob", name, "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    st = wait_status(
        kube, ns, name, lambda s: s.get("phase") == "Succeeded", 900, "Succeeded after unsuspend"
    )
    assert (st.get("nodes"), st.get("worldSize")) == (1, 1), st
    [resized] = [r for r in st.get("recoveries") or [] if r["cause"].startswith("Resized")]
    assert (resized["fromWorldSize"], resized["toWorldSize"], resized["counted"]) == (2, 1, False), resized
    assert "resources.nodes changed while the group was not running" in resized["cause"], resized
    assert condition(st, "Evaluated").get("status") == "True", st
    [pod] = pods(
        kube, ns, f"sft.tuning.dev/job-name={name},sft.tuning.dev/stage=train"
    )  # the 2 went with their Job
    events = json_lines(logs(kube, ns, pod["metadata"]["name"]))
    assert [e["step"] for e in events if e["event"] == "resumed"] == saved, events[-20:]
    assert [e["world_size"] for e in events if e["event"] == "deepspeed"] == [1]
    first_step = next(e["ts"] for e in events if e["event"] == "step")
    print(f"\nresumed at world size 1 from the 2-rank checkpoint of step {saved[0]}: unsuspend -> first step "
          f"{first_step - t_resume:.1f} s (pod start, image, model, checkpoint fetch)")  # fmt: skip

    # The resized adapter evaluates as the unresized run's does: the same gate passes, the same eval loss.
    run = ToyRun(st, eval_results(pod_s3, ns, name))
    loss, reference = run.results["trained"]["eval_loss"], unresized_run.results["trained"]["eval_loss"]
    print(
        f"{name}: eval loss {loss} vs {reference} unresized ({abs(loss - reference) / reference:.2g} relative)"
    )
    assert_passes_the_gate(run)
    assert run.results["base"] == unresized_run.results["base"]  # the same held-out rows, the same base model
    assert loss == pytest.approx(reference, rel=RESIZED_EVAL_RTOL), (loss, reference)


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
