"""Progress and the newest checkpoint from the trainer's /metrics exporter on the rank-0 pod's loopback IP;
many SFTJobs at once."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from conftest import Operator, apply, condition, sftjob, status, wait_phase
from test_operator_phase import DATA_REPORT
from testbed.procs import wait_until

from sftjob_trainer.metrics import TrainerMetrics

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(180)
def test_progress_from_rank0_metrics(
    sftjob_crd: Any, namespace: str, operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube = sftjob_crd
    apply(kube, namespace, sftjob("prog", delay="60s", eval={"enabled": False}, merge={"enabled": False}))
    wait_phase(kube, namespace, "prog", "Training", 60, operator)

    def rank0_ip() -> str | None:
        items = kube.get_json(
            "pods",
            "-n",
            namespace,
            "-l",
            "sft.tuning.dev/stage=train,batch.kubernetes.io/job-completion-index=0",
        )["items"]
        return next((p["status"].get("podIP") for p in items if p["status"].get("phase") == "Running"), None)

    ip = wait_until(rank0_ip, 30, "rank-0 pod IP")
    assert ip.startswith("127."), ip  # the test bed keeps pod IPs on loopback

    # The trainer's own exporter (sftjob_trainer.metrics), served on the very address KWOK gave the pod.
    monkeypatch.setenv("SFTJOB_METRICS_ADDR", ip)
    tm = TrainerMetrics(namespace, "prog", 0, operator.trainer_metrics_port)
    tm.step.set(120)
    tm.total_steps.set(480)
    tm.loss.set(1.25)
    tm.tps.set(2413.4)
    tm.eta.set(4330)
    tm.epoch.set(0.25)
    try:

        def progress(summary: str) -> dict[str, Any] | None:
            p = status(kube, namespace, "prog").get("progress") or {}
            return p if p.get("summary") == summary else None

        def latest_checkpoint() -> str | None:
            return (status(kube, namespace, "prog").get("artifacts") or {}).get("latestCheckpoint")

        p = wait_until(lambda: progress("120/480 (25%)"), 30, "status.progress from rank 0")
        assert p["step"] == 120 and p["totalSteps"] == 480 and p["percent"] == 25.0
        assert p["loss"] == 1.25 and p["tokensPerSecond"] == 2413.4 and p["eta"] == "1h12m"
        assert p["epoch"] == 0.25 and p["lastUpdate"]
        assert status(kube, namespace, "prog").get("data") is None  # the trainer has not curated yet
        tm.record_data(DATA_REPORT, reused=False)
        data = wait_until(lambda: status(kube, namespace, "prog").get("data"), 30, "status.data")
        assert data == {
            "trainExamples": 400, "contentHash": "sha256:0f1e", "reused": False,
            "dropped": {"duplicate": 3, "contaminated": 2}, "mixture": {"general": 300, "domain": 100},
        }  # fmt: skip
        assert latest_checkpoint() is None  # no checkpoint saved yet
        tm.checkpoint_step.set(200)  # what train.py does after a successful checkpoint save
        tm.step.set(240)
        tm.loss.set(0.9)
        p = wait_until(lambda: progress("240/480 (50%)"), 30, "progress update")
        assert p["loss"] == 0.9
        ckpts = f"s3://artifacts/sft/{namespace}/prog/checkpoints/"
        uri = wait_until(latest_checkpoint, 30, "status.artifacts.latestCheckpoint")
        uid = kube.kubectl("get", "sft", "prog", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
        assert uid and uri == f"{ckpts}{uid}/step-200/", uri  # the run's own prefix (docs/recovery.md)
        out = kube.kubectl("get", "sft", "prog", "-n", namespace).stdout
        assert "240/480 (50%)" in out and "1h12m" in out, out
        text = operator.metrics()
        assert 'sftjob_operator_progress_reads_total{result="ok"}' in text
        # the reconcile's own status writes keep it next to the other artifact URIs
        tm.step.set(250)
        wait_until(lambda: progress("250/480 (52.1%)"), 30, "progress update")
        arts = status(kube, namespace, "prog")["artifacts"]
        assert arts["latestCheckpoint"] == uri and arts["checkpoints"] == ckpts, arts
    finally:
        tm.server.shutdown()
        tm.server.server_close()
    kube.kubectl("delete", "sftjob", "prog", "-n", namespace, "--wait=false")


N_JOBS = 200


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_many_sftjobs_at_once_all_finish(sftjob_crd: Any, namespace: str) -> None:
    kube = sftjob_crd
    op = Operator(kube, namespace, "--workers", "8", progress_interval=10.0).start()
    try:
        t0 = time.monotonic()
        objs = [sftjob(f"bulk-{i:03d}", gpus=0) for i in range(N_JOBS)]
        for start in range(0, N_JOBS, 50):  # create (not apply): one request per object
            kube.kubectl(
                "create",
                "-n",
                namespace,
                "-f",
                "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs[start : start + 50]}),
            )
        applied = time.monotonic() - t0
        peak = 0.0

        def all_done() -> bool:
            nonlocal peak
            peak = max(peak, op.rss_mib())
            items = kube.get_json("sftjobs", "-n", namespace)["items"]
            phases = [(i.get("status") or {}).get("phase") for i in items]
            done = sum(p in ("Succeeded", "Failed") for p in phases)
            print(f"  t={time.monotonic() - t0:6.1f}s done={done}/{len(items)}", flush=True)
            return len(items) == N_JOBS and done == N_JOBS

        wait_until(all_done, 1320, f"{N_JOBS} SFTJobs finished", interval=10)
        took = time.monotonic() - t0
        items = kube.get_json("sftjobs", "-n", namespace)["items"]
        failed = [i["metadata"]["name"] for i in items if i["status"]["phase"] != "Succeeded"]
        rss = op.rss_mib()
        print(
            f"\n{N_JOBS} SFTJobs (train+eval+merge each, KWOK pods): applied in {applied:.1f}s, all finished in "
            f"{took:.1f}s; operator RSS now {rss:.0f} MiB, peak sampled {max(peak, rss):.0f} MiB"
        )
        assert not failed, failed
        assert all(condition(i["status"], "Succeeded")["status"] == "True" for i in items)
        text = op.metrics()
        assert f'sftjob_operator_jobs{{phase="Succeeded"}} {float(N_JOBS)}' in text
    finally:
        op.stop()
