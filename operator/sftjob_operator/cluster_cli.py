"""`sftjob status|logs|artifacts NAME`: a run in a cluster, from a terminal, with the user's kubeconfig.

    sftjob status NAME [-n NS]                       phase, progress, conditions, eval table, last events
    sftjob logs NAME [--stage STAGE] [--rank N] [-f]  a stage's pod log (default: the stage the run is at)
    sftjob artifacts NAME [--download DIR]           the manifest; --download fetches and checks every file

The same commands run as a kubectl plugin (`kubectl sft status NAME`: the `kubectl-sft` entry point is
`cli:main`, the `sftjob` command itself).
Credentials for artifacts: $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY if set, else the spec's
output.credentialsSecret read with your kubeconfig. kubernetes and sftjob_api are imported inside the
commands: every `sftjob` invocation (`sftjob run` too) registers these commands when it parses arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Obj = dict[str, Any]


class CliError(Exception):
    """A problem the user can act on: printed without a traceback, exit 1."""


class Cluster:
    """The user's cluster through their kubeconfig (context and namespace as kubectl would pick them)."""

    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None):
        from kubernetes import client, config

        try:
            api = config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        except Exception as e:
            raise CliError(f"cannot load the kubeconfig: {e}") from None
        ctx = next((c for c in contexts if c["name"] == context), active) if context else active
        self.namespace = namespace or (ctx.get("context") or {}).get("namespace") or "default"
        self.core: Any = client.CoreV1Api(
            api
        )  # its models are Optional everywhere: read as the API returns them
        self.custom: Any = client.CustomObjectsApi(api)

    def sftjob(self, name: str) -> Obj:
        from kubernetes.client.exceptions import ApiException

        from sftjob_api import GROUP, PLURAL, VERSION

        try:
            obj: Obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                raise CliError(f"sftjob {name} not found in namespace {self.namespace}") from None
            raise CliError(f"cannot read sftjob {name}: {e.reason}") from None
        return obj

    def events(self, name: str) -> list[Obj]:
        sel = f"involvedObject.kind=SFTJob,involvedObject.name={name}"
        items = self.core.list_namespaced_event(self.namespace, field_selector=sel).items
        return [e.to_dict() for e in sorted(items, key=lambda e: int(e.metadata.resource_version))]


# ---- status ---------------------------------------------------------------------------------------------


def _age(ts: Any, now: datetime) -> str:
    if not ts:
        return "-"
    t = ts if isinstance(ts, datetime) else datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    s = int((now - t).total_seconds())
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(obj: Obj, events: list[Obj], now: datetime, last_events: int = 10) -> str:
    """What `sftjob status` prints (pure: the object and its events in, text out)."""
    meta, st = obj["metadata"], obj.get("status") or {}
    head = st.get("phase") or "(no status yet: is the operator running?)"
    if st.get("reason"):
        head += f" ({st['reason']})"
    lines = [f"{meta['namespace']}/{meta['name']}: {head}"]
    if st.get("message"):
        lines.append(f"  {st['message']}")
    prog = st.get("progress") or {}
    if prog:
        keys = (
            ("summary", "step"),
            ("epoch", "epoch"),
            ("loss", "loss"),
            ("tokensPerSecond", "tok/s"),
            ("eta", "eta"),
        )
        lines.append(
            "Progress: " + ", ".join(f"{label} {prog[k]}" for k, label in keys if prog.get(k) is not None)
        )
    if st.get("conditions"):
        rows = [["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]]
        rows += [
            [
                c["type"],
                c["status"],
                c.get("reason", ""),
                _age(c.get("lastTransitionTime"), now),
                c.get("message", ""),
            ]
            for c in st["conditions"]
        ]
        lines += ["", "Conditions:", *_table(rows)]
    ev = st.get("evalResults") or {}
    metrics = [(k, v) for k, v in ev.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    if metrics:
        lines += ["", "Eval:", *_table([["METRIC", "VALUE"], *[[k, f"{v:.4g}"] for k, v in metrics]])]
        if ev.get("gatesPassed") is not None:
            lines.append(
                "gates: "
                + ("passed" if ev["gatesPassed"] else "FAILED: " + "; ".join(ev.get("failedGates") or []))
            )
    arts = st.get("artifacts") or {}
    if arts:
        lines += ["", "Artifacts:", *[f"  {k}: {v}" for k, v in arts.items()]]
    tr = st.get("tracking") or {}
    if tr.get("mlflowRunId"):  # docs/tracking.md
        lines += [
            "",
            f"MLflow: run {tr['mlflowRunId']} (experiment {tr.get('mlflowExperimentId')}) at "
            f"{tr.get('mlflowTrackingUri')}",
        ]
    if events:
        rows = [["AGE", "TYPE", "REASON", "MESSAGE"]]
        for e in events[-last_events:]:
            when = (
                e.get("last_timestamp")
                or e.get("event_time")
                or (e.get("metadata") or {}).get("creation_timestamp")
            )
            rows.append([_age(when, now), e.get("type") or "", e.get("reason") or "", e.get("message") or ""])
        lines += ["", f"Events (last {min(last_events, len(events))}):", *_table(rows)]
    return "\n".join(lines)


def _status(a: argparse.Namespace, cluster: Cluster) -> int:
    obj = cluster.sftjob(a.name)
    print(format_status(obj, cluster.events(a.name), datetime.now(UTC), a.events))
    return 0


# ---- logs -----------------------------------------------------------------------------------------------


def default_stage(status: Obj) -> str:
    """The stage whose logs matter now: the running one, or the one a failure names (the stage table's
    phases and Failed reasons); else the latest stage with a Job, training by default. A run-wide ending
    (BackoffLimitExceeded, DeadlineExceeded: any group stage's) names the latest group stage with a Job."""
    from sftjob_api import STAGE_TABLE, Stage
    from sftjob_api.stage_table import stage_of_failure, stage_of_phase

    phase, reason = str(status.get("phase") or ""), str(status.get("reason") or "")
    named = stage_of_failure(reason) if phase == "Failed" else stage_of_phase(phase)
    children = status.get("children") or {}
    if named is not None and reason in STAGE_TABLE[named].also_failed:
        groups = [s for s, row in STAGE_TABLE.items() if row.group and children.get(f"{s}Job")]
        return str(groups[-1] if groups else named)
    if named is not None:
        return str(named)
    return str(next((s for s in reversed(STAGE_TABLE) if children.get(f"{s}Job")), Stage.TRAIN))


def _logs(a: argparse.Namespace, cluster: Cluster) -> int:
    from sftjob_api import STAGE_TABLE, Stage

    if a.stage is not None and a.stage not in STAGE_TABLE:
        raise CliError(f"--stage {a.stage}: not a stage; one of {', '.join(STAGE_TABLE)}")
    stage = a.stage or default_stage(cluster.sftjob(a.name).get("status") or {})
    group = STAGE_TABLE[Stage(stage)].group  # ranks: --rank picks one (train, align)
    selector = f"sft.tuning.dev/job-name={a.name},sft.tuning.dev/stage={stage}"
    pods = [
        p
        for p in cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector).items
        if not group
        or (p.metadata.labels or {}).get("batch.kubernetes.io/job-completion-index") == str(a.rank)
    ]
    if not pods:
        raise CliError(
            f"no {stage} pod of {a.name}" + (f" (rank {a.rank})" if group else "") + " in "
            f"namespace {cluster.namespace}: not started yet, or deleted (runPolicy.ttlSecondsAfterFinished)"
        )
    pod = max(pods, key=lambda p: p.metadata.creation_timestamp)  # the newest attempt
    print(f"==> pod {pod.metadata.name} ({stage}, {pod.status.phase})", file=sys.stderr)
    from kubernetes.client.exceptions import ApiException

    try:
        if a.follow:
            resp = cluster.core.read_namespaced_pod_log(
                pod.metadata.name, cluster.namespace, follow=True, tail_lines=a.tail, _preload_content=False
            )
            for chunk in resp.stream():
                sys.stdout.write(chunk.decode(errors="replace"))
        else:
            print(
                cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, tail_lines=a.tail),
                end="",
            )
    except ApiException as e:
        raise CliError(f"cannot read the logs of pod {pod.metadata.name}: {e.reason}: {e.body}") from None
    return 0


# ---- artifacts ------------------------------------------------------------------------------------------


def _credentials(cluster: Cluster, spec: Any) -> None:
    """Export the output's S3 keys from its credentialsSecret unless the environment already has keys."""
    sec = spec.output.credentials_secret
    if os.environ.get("AWS_ACCESS_KEY_ID") or sec is None:
        return
    import base64

    from kubernetes.client.exceptions import ApiException

    try:
        data = cluster.core.read_namespaced_secret(sec.name, cluster.namespace).data or {}
    except ApiException as e:
        raise CliError(
            f"cannot read secret {sec.name} (spec.output.credentialsSecret): {e.reason}; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        ) from None
    for var, key in (
        ("AWS_ACCESS_KEY_ID", sec.access_key_id_key),
        ("AWS_SECRET_ACCESS_KEY", sec.secret_access_key_key),
    ):
        if key not in data:
            raise CliError(f"secret {sec.name} has no key {key}")
        os.environ[var] = base64.b64decode(data[key]).decode()


def download_verified(store: Any, manifest: Obj, dest: Path) -> list[str]:
    """Every manifest file into dest, hashed while it is written; the problems found (empty: all match).
    Every path is checked before anything is written (sftjob_api.paths: the manifest is tenant-writable)."""
    from sftjob_api import Layout
    from sftjob_api.paths import UnsafePath, safe_join

    try:
        targets = [
            Path(safe_join(dest, str(f["path"]), "manifest.json files[].path")) for f in manifest["files"]
        ]
    except UnsafePath as e:
        raise CliError(f"refusing to download: {e}") from None
    problems = []
    for f, target in zip(manifest["files"], targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        try:
            with open(target, "wb") as out:
                for chunk in store.iter_bytes(f["path"]):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        except Exception as e:
            problems.append(f"{f['path']}: cannot download ({e})")
            continue
        if size != f["size"] or h.hexdigest() != f["sha256"]:
            problems.append(
                f"{f['path']}: size/sha256 {size}/{h.hexdigest()[:12]} != manifest {f['size']}/{f['sha256'][:12]}"
            )
    (dest / Layout.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return problems


def _artifacts(a: argparse.Namespace, cluster: Cluster) -> int:
    from sftjob_api import Layout, parse_spec
    from sftjob_api.layout import run_root
    from sftjob_api.storage import open_store

    obj = cluster.sftjob(a.name)
    spec = parse_spec(obj.get("spec") or {})
    root = ((obj.get("status") or {}).get("artifacts") or {}).get("root") or run_root(
        spec, cluster.namespace, a.name
    )
    _credentials(cluster, spec)
    store = open_store(root, spec.output)
    if not store.exists(Layout.MANIFEST):
        raise CliError(f"{root}{Layout.MANIFEST} does not exist (yet): the run writes it last, when it ends")
    manifest = json.loads(store.get_bytes(Layout.MANIFEST))
    files = manifest["files"]
    print(
        f"{root}: {len(files)} files, {manifest.get('totalBytes', 0) / 1e6:.1f} MB, stages {manifest.get('stages')}"
    )
    if not a.download:
        for f in files:
            print(f"  {f['size']:>12}  {f['path']}")
        return 0
    problems = download_verified(store, manifest, Path(a.download))
    if problems:
        raise CliError("downloaded, but these files do not match manifest.json:\n  " + "\n  ".join(problems))
    print(f"downloaded to {a.download}; every file matches manifest.json (size and sha256)")
    return 0


# ---- wiring ---------------------------------------------------------------------------------------------


def _wrap(handler: Any) -> Any:
    def run(a: argparse.Namespace) -> int:
        try:
            return int(handler(a, Cluster(a.kubeconfig, a.context, a.namespace)))
        except CliError as e:
            print(f"sftjob {a.cmd}: {e}", file=sys.stderr)
            return 1

    return run


def add_commands(sub: Any) -> None:
    """Register status, logs and artifacts on the `sftjob` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the SFTJob's name")
    common.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    common.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: $KUBECONFIG, ~/.kube/config"
    )
    common.add_argument("--context", help="kubeconfig context (default: the current one)")
    s = sub.add_parser("status", parents=[common], help="a run in the cluster: phase, progress, eval, events")
    s.add_argument("--events", type=int, default=10, help="how many of the latest events to show")
    s.set_defaults(func=_wrap(_status))
    lg = sub.add_parser("logs", parents=[common], help="logs of a run's pod (the current stage by default)")
    # Checked against sftjob_api's stage table when the command runs (importing it here would slow every
    # `sftjob` invocation).
    lg.add_argument("--stage", help="the stage whose pod to read (default: the one the run is at)")
    lg.add_argument("--rank", type=int, default=0, help="trainer rank (train and align stages)")
    lg.add_argument("--tail", type=int, help="only the last N lines")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(func=_wrap(_logs))
    ar = sub.add_parser("artifacts", parents=[common], help="a run's artifacts; --download checks every file")
    ar.add_argument("--download", metavar="DIR", help="download everything, verifying manifest.json")
    ar.set_defaults(func=_wrap(_artifacts))
