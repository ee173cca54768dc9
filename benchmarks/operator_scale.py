"""The operator at scale (not a test): N SFTJobs applied at once on the real control plane with KWOK GPU nodes.

    python benchmarks/operator_scale.py [--n 200 --n 1000] [--nodes 64] [--delay 5s] [--json out.json]

For each N, on one test bed (tests/testbed: etcd, kube-apiserver, controller-manager, scheduler, KWOK):
  1. the floor: the same child Jobs (the operator's own renderer) created directly, each stage's Job as soon
     as the previous one completed (a watch here), so what remains is KWOK + the Job controller;
  2. the operator (`python -m sftjob_operator`, its own ServiceAccount token) and N SFTJobs created at once.
Reported: when every child train Job existed, apply -> train Job p50/p99, when all were Succeeded (and the
floor), API requests per SFTJob lifecycle by verb and resource as the apiserver's audit log attributes them
to the operator's user (never counted inside the operator), which fields its writes touched, its CPU seconds
and peak RSS (/proc), and its event-loop lag (its own histogram). Needs `bash tests/testbed/provision.sh`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

import operator_scale_audit as audit  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from testbed.kube import Cluster  # noqa: E402
from testbed.operator_e2e import load  # noqa: E402
from testbed.procs import wait_until  # noqa: E402

from sftjob_api import Stage, parse_spec, stages  # noqa: E402
from sftjob_operator.render.names import ChildNames  # noqa: E402
from sftjob_operator.render.objects import RenderOptions, SFTJobRef, render_stage_job  # noqa: E402

E2E = load()  # tests/operator/conftest.py: the Operator subprocess and the SFTJob manifest
SYSTEM_NS, SERVICE_ACCOUNT = "sftjob-bench-system", "sftjob-operator"
OPERATOR_USER = f"system:serviceaccount:{SYSTEM_NS}:{SERVICE_ACCOUNT}"
CREATORS = 16  # threads creating the N objects: "at once"


def manifests(n: int, delay: str, gpus: int) -> list[dict[str, Any]]:
    return [E2E.sftjob(f"s{i:04d}", delay=delay, gpus=gpus) for i in range(n)]


def admin_api(kube: Cluster) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(str(kube.kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = CREATORS
    return client.ApiClient(cfg)


def create_all(fn: Any, items: list[Any]) -> None:
    with concurrent.futures.ThreadPoolExecutor(CREATORS) as pool:
        list(pool.map(fn, items))


# ---- 1. the floor: the same Jobs without the operator --------------------------------------------------------


def floor(kube: Cluster, n: int, delay: str, gpus: int, timeout: float) -> dict[str, float]:
    ns = kube.create_namespace(f"floor-{n}")
    plan: dict[str, tuple[SFTJobRef, Any, tuple[Stage, ...]]] = {}
    for m in manifests(n, delay, gpus):
        spec = parse_spec(m["spec"])
        plan[m["metadata"]["name"]] = (SFTJobRef(m["metadata"]["name"], ns, uid="floor"), spec, stages(spec))
    opts = RenderOptions(default_image="registry.invalid/sftjob-trainer:test")
    lock = threading.Lock()
    done: dict[str, float] = {}
    handled: set[str] = set()
    with admin_api(kube) as api:
        batch = client.BatchV1Api(api)
        pool = concurrent.futures.ThreadPoolExecutor(CREATORS)

        def create(name: str, stage: Stage) -> None:
            ref, spec, _ = plan[name]
            job = render_stage_job(stage, ref, spec, opts)
            job["metadata"].pop("ownerReferences", None)  # no owner: the garbage collector would take it
            batch.create_namespaced_job(ns, job)

        def on_complete(job: Any) -> None:
            labels = job.metadata.labels or {}
            name, stage = labels.get("sft.tuning.dev/job-name"), Stage(labels.get("sft.tuning.dev/stage"))
            order = plan[name][2]
            if stage == order[-1]:
                done[name] = time.time()
            else:
                pool.submit(create, name, order[order.index(stage) + 1])

        stop = threading.Event()

        def watch_jobs() -> None:
            while not stop.is_set():
                w = watch.Watch()
                for ev in w.stream(batch.list_namespaced_job, ns, timeout_seconds=30):
                    job = ev["object"]
                    complete = any(
                        c.type == "Complete" and c.status == "True" for c in job.status.conditions or []
                    )
                    with lock:
                        if complete and job.metadata.uid not in handled:
                            handled.add(job.metadata.uid)
                            on_complete(job)
                    if stop.is_set():
                        w.stop()

        watcher = threading.Thread(target=watch_jobs, daemon=True)
        watcher.start()
        t0 = time.time()
        create_all(lambda name: create(name, Stage.TRAIN), list(plan))
        created = time.time() - t0
        wait_until(lambda: len(done) == n, timeout, f"floor: {n} Job chains complete", interval=1)
        stop.set()
        pool.shutdown()
    figures = {"train_jobs_created_s": created, "all_done_s": max(done.values()) - t0}
    print(f"N={n}: floor {figures}; deleting its Jobs and pods", flush=True)
    kube.delete_namespace(ns, timeout=300)
    return figures


# ---- 2. the operator -------------------------------------------------------------------------------------------


def operator_identity(kube: Cluster) -> Path:
    """A ServiceAccount token kubeconfig for the operator: the audit log names it as OPERATOR_USER."""
    kube.kubectl("create", "namespace", SYSTEM_NS, check=False)
    kube.kubectl(
        "create",
        "clusterrolebinding",
        "sftjob-bench-operator",
        "--clusterrole=cluster-admin",
        f"--serviceaccount={SYSTEM_NS}:{SERVICE_ACCOUNT}",
        check=False,
    )
    return kube.sa_kubeconfig(SYSTEM_NS, SERVICE_ACCOUNT, duration="6h")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(text: str) -> dict[str, Any]:
    """Phase counts and the event-loop lag histogram from the operator's /metrics."""
    phases: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    lag_sum = lag_count = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "sftjob_operator_jobs":
                phases[s.labels["phase"]] = s.value
            elif s.name == "sftjob_operator_event_loop_lag_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == "sftjob_operator_event_loop_lag_seconds_sum":
                lag_sum = s.value
            elif s.name == "sftjob_operator_event_loop_lag_seconds_count":
                lag_count = s.value
    buckets.sort()

    def upper(q: float) -> float:  # the bucket bound holding quantile q
        return next((le for le, c in buckets if c >= q * lag_count), float("inf"))

    return {
        "phases": phases,
        "lag_mean_s": lag_sum / lag_count if lag_count else None,
        "lag_p99_le_s": upper(0.99) if lag_count else None,
        "lag_max_le_s": upper(1.0) if lag_count else None,
    }


def with_operator(kube: Cluster, token: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    ns = kube.create_namespace(f"op-{n}")
    op = E2E.Operator(
        kube,
        ns,
        "--kubeconfig",
        str(token),
        "--workers",
        str(args.workers),
        progress_interval=args.progress_interval,
        name=f"operator-bench-{n}",
    ).start()
    objs = manifests(n, args.delay, args.gpus)
    custom = client.CustomObjectsApi(admin_api(kube))
    t0 = time.time()
    create_all(
        lambda o: custom.create_namespaced_custom_object("sft.tuning.dev", "v1alpha1", ns, "sftjobs", o), objs
    )
    rss = 0.0

    def finished() -> bool:
        nonlocal rss
        rss = max(rss, op.rss_mib())
        phases = scrape(op.metrics())["phases"]
        return phases.get("Succeeded", 0) + phases.get("Failed", 0) >= n

    wait_until(finished, args.timeout, f"{n} SFTJobs finished", interval=2)
    t_done = time.time()
    time.sleep(args.settle)  # writes that trail the last transition belong to the lifecycle too
    t_settled = time.time()
    metrics = scrape(op.metrics())
    cpu, hwm = cpu_seconds(op.proc.pid), peak_rss_mib(op.proc.pid)
    # One DELETE per SFTJob: at N = 1000 on a slow machine that outlasts kubectl's default 120 s here.
    kube.kubectl("delete", "sftjobs", "--all", "-n", ns, "--wait=false", timeout=args.timeout)
    wait_until(
        lambda: not kube.kubectl("get", "sftjobs", "-n", ns, "-o", "name").stdout.strip(),
        args.timeout,
        "SFTJobs deleted (finalizers removed)",
        interval=2,
    )
    t_deleted = time.time()
    op.stop(delete_sftjobs=False)
    kube.delete_namespace(ns, timeout=300)
    return {
        "namespace": ns,
        "t0": t0,
        "t_done": t_done,
        "t_settled": t_settled,
        "t_deleted": t_deleted,
        "phases": metrics["phases"],
        "cpu_s": cpu,
        "peak_rss_mib": max(hwm, rss),
        **{k: v for k, v in metrics.items() if k.startswith("lag_")},
    }


def from_audit(path: Path, ns: str, n: int, run: dict[str, Any]) -> dict[str, Any]:
    reqs = [r for r in audit.read(path) if r.namespace == ns]
    applied = {r.name: r.at for r in reqs if r.verb == "create" and r.resource == "sftjobs" and r.code < 300}
    ops = [r for r in reqs if r.user == OPERATOR_USER]
    train = {
        r.name: r.at for r in ops if r.verb == "create" and r.resource == "jobs" and r.name.endswith("-train")
    }
    lat = [
        train[ChildNames(name).train_job] - at
        for name, at in applied.items()
        if ChildNames(name).train_job in train
    ]
    succeeded = [
        r.at
        for r in ops
        if r.resource == "sftjobs/status" and ((r.body or {}).get("status") or {}).get("phase") == "Succeeded"
    ]
    first = min(applied.values())
    life = [r for r in ops if r.at <= run["t_settled"] and r.verb != "watch"]
    deletion = [r for r in ops if r.at > run["t_settled"] and r.verb != "watch"]
    return {
        "applied": len(applied),
        "train_jobs": len(train),
        "train_jobs_created_s": max(train.values()) - first if train else None,
        "apply_to_job_p50_s": audit.percentile(lat, 50) if lat else None,
        "apply_to_job_p99_s": audit.percentile(lat, 99) if lat else None,
        "all_succeeded_s": max(succeeded) - first if len(succeeded) >= n else None,
        "writes_per_sftjob": sum(r.write for r in life) / n,
        "reads_per_sftjob": sum(not r.write for r in life) / n,
        "deletion_writes_per_sftjob": sum(r.write for r in deletion) / n,
        "watches": sum(r.verb == "watch" for r in ops),
        "requests": audit.per_lifecycle(audit.by_verb_resource(life), n),
        "writes": audit.per_lifecycle(audit.by_write_fields(life), n),
        "deletion": audit.per_lifecycle(audit.by_write_fields(deletion), n),
        "errors": sum(r.code >= 400 for r in ops),
        # which requests were refused, and with what: [((code, verb, resource), count)], most frequent first
        "errors_by": Counter((r.code, r.verb, r.resource) for r in ops if r.code >= 400).most_common(),
    }


# ---- report ----------------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def report(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    lines += [
        "| N | all train Jobs created | apply→train Job p50 / p99 | all Succeeded | floor (Jobs direct) "
        "| writes / SFTJob (+ deletion) | reads / SFTJob | operator CPU | peak RSS | loop lag mean / p99 ≤ / max ≤ |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        a, o, f = r["audit"], r["operator"], r["floor"]
        lines.append(
            f"| {r['n']} | {fmt(a['train_jobs_created_s'])} s | {fmt(a['apply_to_job_p50_s'], 2)} / "
            f"{fmt(a['apply_to_job_p99_s'], 2)} s | {fmt(a['all_succeeded_s'])} s | {fmt(f.get('all_done_s'))} s "
            f"| {a['writes_per_sftjob']:.2f} (+{a['deletion_writes_per_sftjob']:.2f}) | {a['reads_per_sftjob']:.2f} "
            f"| {o['cpu_s']:.1f} s | {o['peak_rss_mib']:.0f} MiB | {fmt(o['lag_mean_s'], 3)} / "
            f"{fmt(o['lag_p99_le_s'], 3)} / {fmt(o['lag_max_le_s'], 3)} s |"
        )
    for r in results:
        a = r["audit"]
        lines += ["", f"N = {r['n']}: the operator's requests per SFTJob (audit log), apply → Succeeded", ""]
        lines += ["| verb | resource | per SFTJob | total |", "|---|---|---:|---:|"]
        lines += [f"| {v} | {res} | {p:.2f} | {c} |" for (v, res), c, p in a["requests"]]
        lines += ["", f"N = {r['n']}: its writes by what they touched (lifecycle, then deletion)", ""]
        lines += ["| verb | resource | fields | per SFTJob | total |", "|---|---|---|---:|---:|"]
        lines += [f"| {v} | {res} | {fl} | {p:.2f} | {c} |" for (v, res, fl), c, p in a["writes"]]
        lines += [
            f"| {v} | {res} | {fl} (deletion) | {p:.2f} | {c} |" for (v, res, fl), c, p in a["deletion"]
        ]
        lines += [
            "",
            f"watch requests: {a['watches']}; responses ≥ 400: {a['errors']}; "
            f"SFTJobs applied {a['applied']}, train Jobs created {a['train_jobs']}; "
            f"phases at the end {r['operator']['phases']}",
        ]
        if a["errors_by"]:
            lines += ["", "| responses ≥ 400: code | verb | resource | total |", "|---:|---|---|---:|"]
            lines += [f"| {code} | {verb} | {res} | {c} |" for (code, verb, res), c in a["errors_by"]]
    return "\n".join(lines)


class LoadSampler(threading.Thread):
    """The 1-minute load average every 10 s: how busy the machine was while measuring."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(10):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        s = self.samples or [os.getloadavg()[0]]
        return f"1-min load average during the run: mean {sum(s) / len(s):.1f}, max {max(s):.1f}"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="SFTJobs at once (repeat: 200, 500, 1000)")
    p.add_argument("--nodes", type=int, default=64, help="KWOK GPU nodes (8 GPUs each)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per pod (0: pods fit anywhere)")
    p.add_argument("--delay", default="5s", help="how long each KWOK pod runs")
    p.add_argument("--workers", type=int, default=8, help="operator --workers")
    p.add_argument("--progress-interval", type=float, default=15.0, help="operator timer (production: 15)")
    p.add_argument("--settle", type=float, default=30.0, help="seconds counted after the last SFTJob ended")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", type=Path, help="keep the test bed's logs and audit log here")
    args = p.parse_args()
    sizes = args.n or [200]
    work = Path(tempfile.mkdtemp(prefix="sftjob-operator-scale-"))
    logs = args.keep or work / "logs"
    kube = Cluster(work, logs, gpu_nodes=args.nodes, audit_policy=audit.policy(OPERATOR_USER))
    load = LoadSampler()
    load.start()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: list[dict[str, Any]] = []
    try:
        kube.start(timeout=300)
        kube.apply_crd(REPO / "crds" / "sft.tuning.dev_sftjobs.yaml")
        token = operator_identity(kube)
        for n in sizes:
            t = time.time()
            fl = {} if args.no_floor else floor(kube, n, args.delay, args.gpus, args.timeout)
            print(f"N={n}: floor and clean-up took {time.time() - t:.0f} s", flush=True)
            run = with_operator(kube, token, n, args)
            print(f"N={n}: operator run done ({time.time() - run['t0']:.0f} s)", flush=True)
            results.append(
                {
                    "n": n,
                    "floor": fl,
                    "operator": run,
                    "audit": from_audit(kube.audit_log, run["namespace"], n, run),
                }
            )
    finally:
        kube.stop()
        if args.keep and kube.audit_log.exists():
            shutil.copy(kube.audit_log, args.keep / "audit.log")
        shutil.rmtree(work, ignore_errors=True)
    load.stopped.set()
    header = (
        f"`python benchmarks/operator_scale.py {' '.join(sys.argv[1:])}` — {started}, {machine()}; "
        f"{args.nodes} KWOK nodes x 8 GPUs, {args.gpus} GPU per pod, pods run {args.delay}; operator "
        f"--workers {args.workers} --progress-interval {args.progress_interval:g}; {load.summary()}"
    )
    print(report(results, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
