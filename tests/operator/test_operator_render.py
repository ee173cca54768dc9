"""Unit tests of the pure renderers: children of an SFTJob, deterministic and secure."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pod_files import trainer_config_file

from sftjob_api import Layout, SFTJobStatus, Stage, merge_enabled, parse_spec
from sftjob_api.exit_codes import PERMANENT_CODES, ExitCode
from sftjob_api.layout import checkpoint_uri, status_artifacts
from sftjob_api.trainer_config import TrainerConfig
from sftjob_operator.render import objects as o
from sftjob_operator.render import phase as ph
from sftjob_operator.render import pod
from sftjob_operator.render.names import LABEL_JOB_NAME, LABEL_STAGE, ChildNames
from sftjob_operator.render.observe import JobObs
from sftjob_operator.render.status import build_status
from sftjob_operator.render.trainer_config import cluster_output_error, render_trainer_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return doc


def ref_of(doc: dict[str, Any], ns: str = "team-a", uid: str = "uid-123") -> o.SFTJobRef:
    labels = doc["metadata"].get("labels") or {}
    return o.SFTJobRef(doc["metadata"]["name"], ns, uid, tuple(sorted(labels.items())))


@pytest.fixture
def multinode() -> tuple[o.SFTJobRef, Any]:
    doc = load("sftjob-multinode-qlora.yaml")
    return ref_of(doc), parse_spec(doc["spec"])


@pytest.fixture
def minimal() -> tuple[o.SFTJobRef, Any]:
    doc = load("sftjob-minimal.yaml")
    return ref_of(doc), parse_spec(doc["spec"])


def all_children(ref: o.SFTJobRef, spec: Any) -> list[dict[str, Any]]:
    opts = o.RenderOptions()
    return [
        o.render_service(ref),
        o.render_stage_job(Stage.TRAIN, ref, spec, opts),
        o.render_stage_job(Stage.EVAL, ref, spec, opts),
        o.render_stage_job(Stage.MERGE, ref, spec, opts),
        o.render_stage_job(Stage.CURATE, ref, spec, opts),
    ]


def test_names_are_deterministic_and_short(multinode: Any) -> None:
    ref, spec = multinode
    first = all_children(ref, spec)
    second = all_children(ref, copy.deepcopy(spec))
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    names = [c["metadata"]["name"] for c in first]
    assert names == [
        "llama-8b-support-bot-train",
        "llama-8b-support-bot-train",
        "llama-8b-support-bot-eval",
        "llama-8b-support-bot-merge",
        "llama-8b-support-bot-curate",
    ]
    # pod hostnames <job>-<index> of a 42-character name stay a DNS label
    assert len(ChildNames("a" * 42).train_job + "-511") <= 63


def test_every_child_is_owned_and_labelled(multinode: Any) -> None:
    ref, spec = multinode
    for child in all_children(ref, spec):
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "sft.tuning.dev/v1alpha1",
                "kind": "SFTJob",
                "name": ref.name,
                "uid": "uid-123",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][LABEL_JOB_NAME] == ref.name
        assert meta["labels"][LABEL_STAGE] in ("train", "eval", "merge", "curate")


def test_train_job_is_indexed_with_torchrun_exec_array(multinode: Any) -> None:
    ref, spec = multinode
    job = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())
    s = job["spec"]
    assert s["completionMode"] == "Indexed"
    assert s["completions"] == s["parallelism"] == 2
    assert s["backoffLimit"] == 0  # the operator restarts the group (tests/operator/test_recovery.py)
    assert s["activeDeadlineSeconds"] == 86400
    assert s["podReplacementPolicy"] == "Failed"
    pod = s["template"]["spec"]
    assert pod["subdomain"] == "llama-8b-support-bot-train"
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    # `launch` = torchrun (torch.distributed.run) that keeps the worker's real exit code
    assert c["command"] == [
        "python",
        "-m",
        "sftjob_trainer",
        "launch",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "train",
        "--config",
        "/etc/sftjob/config.yaml",
    ]
    assert "args" not in c
    env = {e["name"]: e for e in c["env"]}
    assert env["MASTER_ADDR"]["value"] == "llama-8b-support-bot-train-0.llama-8b-support-bot-train"
    assert env["SFTJOB_RUN_ID"]["value"] == ref.uid  # the run's checkpoint prefix (docs/recovery.md)
    assert (
        env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    # Only what Kubernetes must inject is env; the S3 settings (region, endpoint, pathStyle) are in the config.
    assert set(env) == {
        "SFTJOB_CONFIG",
        "SFTJOB_METRICS_PORT",
        "SFTJOB_TERMINATION_LOG",
        "POD_NAME",
        "PYTHONUNBUFFERED",
        "SFTJOB_RUN_ID",
        "HOME",
        "PYTHONSAFEPATH",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MASTER_ADDR",
        "MASTER_PORT",
        "JOB_COMPLETION_INDEX",
        "OMP_NUM_THREADS",
    }
    assert env["OMP_NUM_THREADS"]["value"] == "8"  # 64 CPUs shared by 8 ranks
    assert c["resources"]["limits"] == {"cpu": "64", "memory": "900Gi", "nvidia.com/gpu": "8"}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "training-high"


def test_no_spec_string_reaches_a_shell(minimal: Any) -> None:
    ref, _ = minimal
    doc = load("sftjob-minimal.yaml")
    doc["spec"]["model"]["uri"] = "/models/$(rm -rf /);`reboot`"
    spec = parse_spec(doc["spec"])
    for job in all_children(ref, spec)[1:]:
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert c["command"][:3] == ["python", "-m", "sftjob_trainer"]
        assert not any(x in ("sh", "bash", "-c", "/bin/sh") for x in c["command"])
        assert "rm -rf" not in json.dumps(c["command"]) + json.dumps(c["env"])
    config = trainer_config_file(o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions()))
    assert "rm -rf" in config  # the value lives in the config file, as data


def test_security_context_and_shm(minimal: Any) -> None:
    ref, spec = minimal
    for job in all_children(ref, spec)[1:]:
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        sc = pod["containers"][0]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert "/dev/shm" in mounts and "/etc/sftjob" in mounts
        # a read-only root: what the trainer writes ($HOME's caches, /tmp) lies on emptyDirs of its own
        assert sc["readOnlyRootFilesystem"] is True
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        writable = {
            m["mountPath"]
            for m in pod["containers"][0]["volumeMounts"]
            if "emptyDir" in vols[m["name"]] and not m.get("readOnly")
        }
        assert {env["HOME"], "/tmp"} <= writable
        assert env["PYTHONSAFEPATH"] == "1"  # the writable working directory is not on the import path


def test_pod_failure_policy_maps_trainer_exit_codes(minimal: Any) -> None:
    ref, spec = minimal
    job = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 4]},
    }
    assert sorted(rules[0]["onExitCodes"]["values"]) == sorted(PERMANENT_CODES)
    assert len(rules) == 1  # disruptions too fail the train Job: the operator restarts the group uncounted
    for code in (ExitCode.RETRYABLE, ExitCode.STORAGE, ExitCode.PREEMPTED):
        assert code not in rules[0]["onExitCodes"]["values"]


def test_pod_annotations_and_labels_reach_every_pod(minimal: Any) -> None:
    ref, _ = minimal
    doc = load("sftjob-minimal.yaml")
    doc["spec"]["resources"] = {
        "podAnnotations": {"kwok.sftjob.dev/delay": "3s"},
        "podLabels": {"team": "nlp", LABEL_JOB_NAME: "spoofed"},
    }
    spec = parse_spec(doc["spec"])
    for job in all_children(ref, spec)[1:]:
        tmeta = job["spec"]["template"]["metadata"]
        assert tmeta["annotations"]["kwok.sftjob.dev/delay"] == "3s"
        assert set(tmeta["annotations"]) == {"kwok.sftjob.dev/delay", pod.CONFIG_ANNOTATION}
        assert tmeta["labels"]["team"] == "nlp"
        assert tmeta["labels"][LABEL_JOB_NAME] == "minimal"  # ours win: the index relies on them


def test_kueue_label_passthrough_and_suspended_children(multinode: Any, minimal: Any) -> None:
    ref, spec = multinode
    assert ref.queued
    for job in all_children(ref, spec)[1:]:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
        assert job["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
        assert job["spec"]["suspend"] is True
    ref2, spec2 = minimal
    assert not ref2.queued
    assert o.render_stage_job(Stage.TRAIN, ref2, spec2, o.RenderOptions())["spec"]["suspend"] is False
    spec2.suspend = True
    assert o.render_stage_job(Stage.TRAIN, ref2, spec2, o.RenderOptions())["spec"]["suspend"] is True


def test_eval_and_merge_jobs(multinode: Any) -> None:
    ref, spec = multinode
    ev = o.render_stage_job(Stage.EVAL, ref, spec, o.RenderOptions())
    mg = o.render_stage_job(Stage.MERGE, ref, spec, o.RenderOptions())
    assert ev["spec"]["completions"] == 1 and ev["spec"]["completionMode"] == "NonIndexed"
    assert ev["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "sftjob_trainer",
        "eval",
        "--config",
        "/etc/sftjob/config.yaml",
    ]
    assert ev["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert mg["spec"]["template"]["spec"]["containers"][0]["command"][3] == "merge"
    assert "nvidia.com/gpu" not in mg["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "activeDeadlineSeconds" not in ev["spec"]
    assert (
        ev["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    )


def curated(doc: dict[str, Any], **curation: Any) -> Any:
    doc = copy.deepcopy(doc)
    doc["spec"]["dataset"]["curation"] = {"nearDuplicates": {}, **curation}
    return parse_spec(doc["spec"])


def test_curate_job_is_one_pod_without_gpu_unless_perplexity_scores(multinode: Any) -> None:
    """The curate Job runs before any training GPU is held: one pod, no GPU, no rendezvous, no avoided nodes;
    the perplexity filter scores rows with the base model, so then it gets one GPU (as eval does)."""
    doc = load("sftjob-multinode-qlora.yaml")
    ref = replace(ref_of(doc), avoid_nodes=("bad-node",))
    spec = curated(doc)
    job = o.render_stage_job(Stage.CURATE, ref, spec, o.RenderOptions())
    assert job["metadata"]["name"] == ChildNames(ref.name).curate_job == "llama-8b-support-bot-curate"
    assert job["metadata"]["labels"][LABEL_STAGE] == "curate"
    s = job["spec"]
    assert (s["completions"], s["parallelism"], s["completionMode"]) == (1, 1, "NonIndexed")
    assert s["backoffLimit"] == 2  # min(runPolicy.backoffLimit 4, 2), as for eval
    assert "activeDeadlineSeconds" not in s
    assert (
        s["podFailurePolicy"]
        == o.render_stage_job(Stage.EVAL, ref, spec, o.RenderOptions())["spec"]["podFailurePolicy"]
    )
    assert s["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [int(c) for c in PERMANENT_CODES]
    assert s["suspend"] is True  # the example is Kueue-managed: queued like every stage
    pod = s["template"]["spec"]
    assert s["template"]["metadata"]["labels"][LABEL_STAGE] == "curate"
    assert s["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "sftjob_trainer", "curate", "--config", "/etc/sftjob/config.yaml"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["resources"]["limits"]["cpu"] == "64"  # the run's cpu/memory, like eval and merge
    assert [p["name"] for p in c["ports"]] == ["metrics"]  # no rendezvous port
    assert "subdomain" not in pod and "affinity" not in pod  # no avoid_nodes anti-affinity
    assert "MASTER_ADDR" not in {e["name"] for e in c["env"]}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"  # a gate failure's text reaches status
    train = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())["spec"]["template"]["spec"]
    assert "affinity" in train  # the same ref keeps the train pods off the bad node
    # same pod security, volumes and credentials as eval
    ev = o.render_stage_job(Stage.EVAL, ref, spec, o.RenderOptions())["spec"]["template"]["spec"]
    assert pod["securityContext"] == ev["securityContext"] and pod["volumes"] == ev["volumes"]
    assert (
        c["env"] == ev["containers"][0]["env"]
        and c["securityContext"] == ev["containers"][0]["securityContext"]
    )

    scored = curated(doc, perplexity={"percentile": 95})
    c = o.render_stage_job(Stage.CURATE, ref, scored, o.RenderOptions())["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"  # min(gpusPerNode 8, 1)
    doc["spec"]["resources"]["gpusPerNode"] = 0
    c = o.render_stage_job(Stage.CURATE, ref, curated(doc, perplexity={"percentile": 95}), o.RenderOptions())
    assert "nvidia.com/gpu" not in c["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_curate_job_suspended_like_every_child(minimal: Any) -> None:
    ref, _ = minimal
    doc = load("sftjob-minimal.yaml")
    spec = curated(doc)
    assert o.render_stage_job(Stage.CURATE, ref, spec, o.RenderOptions())["spec"]["suspend"] is False
    spec.suspend = True
    assert o.render_stage_job(Stage.CURATE, ref, spec, o.RenderOptions())["spec"]["suspend"] is True


def test_service_is_headless_and_selects_train_pods(minimal: Any) -> None:
    ref, _ = minimal
    svc = o.render_service(ref)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"][LABEL_STAGE] == "train"
    assert svc["metadata"]["name"] == ChildNames("minimal").service


def test_one_pod_group_meets_on_loopback_without_a_service(minimal: Any, multinode: Any) -> None:
    """A Service exists only for the rank-0 DNS name of a multi-node group: one pod needs none."""
    for (ref, spec), nodes in ((minimal, 1), (multinode, 2)):
        assert spec.resources.nodes == nodes
        pod = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert o.needs_service(spec) is (nodes > 1)
        if nodes == 1:
            assert env["MASTER_ADDR"] == "127.0.0.1" and "subdomain" not in pod
        else:
            assert env["MASTER_ADDR"] == ChildNames(ref.name).master_addr
            assert pod["subdomain"] == o.render_service(ref)["metadata"]["name"]


def test_cpu_only_sets_ds_accelerator(minimal: Any) -> None:
    ref, _ = minimal
    doc = load("sftjob-minimal.yaml")
    doc["spec"]["resources"] = {"gpusPerNode": 0}
    spec = parse_spec(doc["spec"])
    c = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]
    assert "--nproc-per-node=1" in c["command"]
    assert c["command"][3] == "launch"
    assert c["resources"] == {}


def test_threads_per_rank_follow_the_cpu_limit(minimal: Any) -> None:
    # torch sizes its pool by the node's cores, not the pod's quota; ranks of one pod share its CPUs
    assert [pod.omp_threads(cpu, procs) for cpu, procs in [("900m", 1), ("4", 1), ("2.5", 1), ("96", 8)]] == [
        1,
        4,
        2,
        12,
    ]
    assert (
        pod.omp_threads("4", 8) == 1
        and pod.omp_threads(None, 1) is None
        and pod.omp_threads("1Gi", 1) is None
    )
    ref, _ = minimal
    doc = load("sftjob-minimal.yaml")
    for resources, threads in (({"gpusPerNode": 0, "cpu": "900m"}, "1"), ({"gpusPerNode": 0}, None)):
        doc["spec"]["resources"] = resources
        job = o.render_stage_job(Stage.TRAIN, ref, parse_spec(doc["spec"]), o.RenderOptions())
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env.get("OMP_NUM_THREADS") == threads, env


def test_trainer_config_and_artifacts(minimal: Any) -> None:
    ref, spec = minimal
    cfg = render_trainer_config("team-a", "minimal", spec)
    assert cfg["run"] == {
        "namespace": "team-a",
        "name": "minimal",
        "outputRoot": "s3://artifacts/sft/team-a/minimal/",
    }
    assert cfg["model"]["uri"] == "s3://models/smollm2-135m-instruct"
    # the config is the spec itself (every section, the same wire names) plus run and runtime
    sections = {k: v for k, v in cfg.items() if k not in ("run", "runtime")}
    assert sections == spec.model_dump(mode="json", exclude_none=True)
    # every stage's pods read the same file (the spec parts it comes from are immutable)
    jobs = all_children(ref, spec)[1:]
    assert {trainer_config_file(job) for job in jobs} == {trainer_config_file(jobs[0])}
    assert json.loads(trainer_config_file(jobs[0])) == cfg
    a = status_artifacts(spec, "team-a", "minimal")
    assert a.adapter == "s3://artifacts/sft/team-a/minimal/adapter/"
    assert a.merged == "s3://artifacts/sft/team-a/minimal/merged/"
    assert a.manifest == "s3://artifacts/sft/team-a/minimal/manifest.json"


def test_status_artifacts_follow_the_stages(minimal: Any) -> None:
    _, spec = minimal
    full = spec.model_copy(update={"method": spec.method.model_copy(update={"type": "full"})})
    a = status_artifacts(full, "team-a", "minimal")
    assert a.adapter == "s3://artifacts/sft/team-a/minimal/model/"  # what method full trains
    assert a.merged is None and a.eval == "s3://artifacts/sft/team-a/minimal/eval/"
    train_only = spec.model_copy(update={"eval": spec.eval.model_copy(update={"enabled": False})})
    train_only = train_only.model_copy(update={"merge": spec.merge.model_copy(update={"enabled": False})})
    a = status_artifacts(train_only, "team-a", "minimal")
    assert a.eval is None and a.merged is None and a.manifest is not None


def test_checkpoint_uri_is_the_trainers_checkpoint_prefix(minimal: Any) -> None:
    _, spec = minimal
    uri = checkpoint_uri(spec, "team-a", "minimal", "0c5e-uid", 40)
    assert uri == "s3://artifacts/sft/team-a/minimal/checkpoints/0c5e-uid/step-40/"
    root = render_trainer_config("team-a", "minimal", spec)["run"]["outputRoot"]
    # where the trainer writes it (sftjob_trainer.checkpoint)
    assert uri == f"{root}{Layout.checkpoint('0c5e-uid', 40)}/"
    checkpoints = status_artifacts(spec, "team-a", "minimal").checkpoints
    assert checkpoints is not None and uri.startswith(checkpoints)


def test_status_keeps_latest_checkpoint_under_the_checkpoints_prefix(minimal: Any) -> None:
    _, spec = minimal
    meta = {"namespace": "team-a", "name": "minimal", "creationTimestamp": "2026-01-01T00:00:00Z"}
    decision = ph.Decision(ph.TRAINING, "PodsRunning", "1 trainer pod running")
    obs = ph.Observed(phase=ph.TRAINING, jobs={Stage.TRAIN: JobObs(name="minimal-train", active=1, ready=1)})
    now = datetime(2026, 1, 1, 0, 5, tzinfo=UTC)

    def built(prev_artifacts: dict[str, str] | None) -> dict[str, str]:
        raw = {"phase": ph.TRAINING, "artifacts": prev_artifacts} if prev_artifacts else {}
        prev = SFTJobStatus.model_validate(raw)
        st = build_status(meta, prev, spec, decision, obs, None, None, now, 1, ChildNames("minimal"))
        arts: dict[str, str] = st.model_dump(mode="json", exclude_none=True)["artifacts"]
        return arts

    assert "latestCheckpoint" not in built(None)
    latest = checkpoint_uri(spec, "team-a", "minimal", "0c5e-uid", 40)
    # written by the progress reader; the reconcile's own artifacts keep it, so no status write undoes it
    assert built({"latestCheckpoint": latest})["latestCheckpoint"] == latest
    # a checkpoint of another output root (spec.output.uri changed) is not carried over
    assert "latestCheckpoint" not in built(
        {"latestCheckpoint": "s3://old/team-a/minimal/checkpoints/step-9/"}
    )


def test_merge_disabled_for_full_and_cluster_output_rule() -> None:
    doc = load("sftjob-minimal.yaml")
    doc["spec"]["method"] = {"type": "full"}
    assert not merge_enabled(parse_spec(doc["spec"]))
    doc = load("sftjob-minimal.yaml")
    assert cluster_output_error(parse_spec(doc["spec"])) is None
    doc["spec"]["output"]["uri"] = "./out"
    err = cluster_output_error(parse_spec(doc["spec"]))
    assert err is not None and err.startswith("spec.output.uri:")
    doc["spec"]["output"]["uri"] = "/mnt/pvc/out"
    assert cluster_output_error(parse_spec(doc["spec"])) is None
    doc["spec"]["dataset"]["train"] = ["s3://bucket/x.jsonl", "./data/train.jsonl"]
    err = cluster_output_error(parse_spec(doc["spec"]))
    assert err is not None and err.startswith("spec.dataset.train.1:")


def test_rendered_objects_validate_against_kubernetes_schemas(multinode: Any) -> None:
    import kubernetes_validate as kv

    ref, spec = multinode
    for child in all_children(ref, spec):
        kv.validate(child, "1.34", strict=True)


def test_rendered_config_is_a_valid_trainer_config(multinode: Any, minimal: Any) -> None:
    """The contract with the trainer: the config model (sftjob_api) accepts what the operator renders."""
    for ref, spec in (multinode, minimal):
        job = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())
        cfg = TrainerConfig.model_validate(json.loads(trainer_config_file(job)))
        assert cfg.run.name == ref.name and cfg.run.namespace == "team-a"
        assert cfg.run.output_root == f"s3://artifacts/sft/team-a/{ref.name}/"
        assert cfg.resources.deepspeed.zero_stage == spec.resources.deepspeed.zero_stage
        assert cfg.training == spec.training and cfg.model == spec.model


def test_pvc_inputs_are_mounted_read_only_and_rewritten(minimal: Any) -> None:
    ref, _ = minimal
    doc = load("sftjob-minimal.yaml")
    doc["spec"]["model"]["uri"] = "pvc://models/llama-8b"
    doc["spec"]["dataset"]["train"] = [
        "pvc://datasets/a.jsonl",
        "pvc://datasets/b.jsonl",
        "s3://bucket/c.jsonl",
    ]
    spec = parse_spec(doc["spec"])
    for job in all_children(ref, spec)[1:]:
        pod = job["spec"]["template"]["spec"]
        claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [
            {"claimName": "models", "readOnly": True},
            {"claimName": "datasets", "readOnly": True},
        ]
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/mnt/pvc/models"]["readOnly"] and mounts["/mnt/pvc/datasets"]["readOnly"]
    job = o.render_stage_job(Stage.TRAIN, ref, spec, o.RenderOptions())
    cfg = TrainerConfig.model_validate(json.loads(trainer_config_file(job)))
    assert cfg.model.uri == "/mnt/pvc/models/llama-8b"
    assert cfg.dataset.train == [
        "/mnt/pvc/datasets/a.jsonl",
        "/mnt/pvc/datasets/b.jsonl",
        "s3://bucket/c.jsonl",
    ]


def test_pvc_preference_files_are_mounted_and_rewritten_for_the_align_stage(minimal: Any) -> None:
    ref, _ = minimal
    doc = load("sftjob-minimal.yaml")
    doc["spec"]["alignment"] = {
        "dataset": {"train": ["pvc://prefs/p.jsonl"], "eval": ["s3://bucket/e.jsonl"]}
    }
    spec = parse_spec(doc["spec"])
    job = o.render_stage_job(Stage.ALIGN, ref, spec, o.RenderOptions())
    pod = job["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "prefs", "readOnly": True}]
    cfg = TrainerConfig.model_validate(json.loads(trainer_config_file(job)))
    assert cfg.alignment is not None
    assert (cfg.alignment.dataset.train, cfg.alignment.dataset.eval) == (
        ["/mnt/pvc/prefs/p.jsonl"],
        ["s3://bucket/e.jsonl"],
    )
    doc["spec"]["alignment"]["dataset"]["train"] = ["./prefs.jsonl"]
    err = cluster_output_error(parse_spec(doc["spec"]))
    assert err is not None and err.startswith("spec.alignment.dataset.train.0:")
