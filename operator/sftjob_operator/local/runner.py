"""`sftjob run SPEC.yaml`: validate with the API models, then train -> eval -> merge on this machine.

Each stage is the trainer image's own entry point run as a child process, exactly as the operator runs it
in a Job: train under torchrun (`python -m sftjob_trainer launch`, nodes x max(gpusPerNode, 1) local ranks),
then `python -m sftjob_trainer eval` and `... merge` with the same rendered config file. Phases are printed
as the operator would set them in status. Ctrl-C sends SIGTERM to the trainer, which finishes its step, saves
a checkpoint and exits; running the same command again resumes from it (finished stages are skipped).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..api import SFTJob, SpecError, parse_sftjob
from ..render.trainer_config import render_trainer_config
from . import report

EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


@dataclass
class Options:
    spec_path: str
    output: str | None = None  # local directory overriding spec.output.uri
    embedded_s3: bool = False
    work_dir: str | None = None
    fresh: bool = False  # delete earlier artifacts of this run first
    echo: Callable[[str], None] = field(default=lambda s: print(s, flush=True))


def load_spec(path: str) -> SFTJob:
    """Read and validate the manifest; raises SpecError with "field.path: message" lines."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise SpecError([f"cannot read {path}: {e.strerror}"], path) from None
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {e}"], path) from None
    if not isinstance(doc, dict):
        raise SpecError(["the file must hold one SFTJob object"], path)
    return parse_sftjob(doc, path)


def _local(uri: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, uri)) if uri.startswith(("./", "../")) else uri


def render_local_config(job: SFTJob, spec_dir: str, root: str, work_dir: str, model_dir: str) -> dict[str, Any]:
    """The trainer config the operator would render, with local paths resolved for this machine."""
    ns = job.metadata.namespace or "local"
    cfg = render_trainer_config(ns, job.metadata.name, job.spec)
    cfg["run"]["outputRoot"] = root
    cfg["model"]["uri"] = model_dir
    if cfg["model"].get("tokenizer"):
        cfg["model"]["tokenizer"] = _local(cfg["model"]["tokenizer"], spec_dir)
    ds = cfg["dataset"]
    ds["train"] = [_local(u, spec_dir) for u in ds["train"]]
    if ds.get("eval"):
        ds["eval"] = [_local(u, spec_dir) for u in ds["eval"]]
    if cfg["merge"].get("uri") and not cfg["merge"]["uri"].startswith("s3://"):
        cfg["merge"]["uri"] = os.path.abspath(cfg["merge"]["uri"])
    cfg["runtime"] = {"metricsPort": 0, "workDir": work_dir}
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(nproc: int, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if not shutil.which("nvidia-smi"):
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.pop("SFTJOB_CONFIG", None)
    return env


def worker_pids(root: int) -> list[int]:
    """The trainer worker processes below `root` (Linux /proc), not torchrun or the launch wrapper.

    Ctrl-C signals the workers directly: each finishes its step, checkpoints and exits 143, however long the
    step takes. Signalling torchrun instead would give them only torchrun's 30 s before it kills them.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "sftjob_trainer" in argv and "launch" not in argv and "torch.distributed.run" not in argv:
            out.append(pid)
    return sorted(out)


class Stage:
    """A child process whose stdout JSON lines are events; everything else goes to the stage's log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str) -> None:
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_path

    def run(self, on_event: Callable[[dict[str, Any]], None]) -> tuple[int, bool]:
        """(exit code, interrupted by Ctrl-C)."""
        interrupted = False
        with open(self.log_path, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True,
                                    bufsize=1, start_new_session=True)  # Ctrl-C reaches us only
            assert proc.stdout is not None
            while True:
                try:
                    for line in proc.stdout:
                        log.write(line)
                        log.flush()
                        if line.startswith("{") and '"event"' in line:
                            with contextlib.suppress(json.JSONDecodeError):
                                on_event(json.loads(line))
                    break
                except KeyboardInterrupt:
                    if interrupted:  # second Ctrl-C: stop now
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        interrupted = True
                        for pid in worker_pids(proc.pid) or [proc.pid]:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGTERM)
            return proc.wait(), interrupted

    def tail(self, n: int = 25) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])


class Progress:
    """The training progress bar (tqdm) fed by the trainer's `step` events."""

    def __init__(self, steps_file: str) -> None:
        self.bar: Any = None
        self.steps_file = steps_file
        self.start = 0

    def __call__(self, ev: dict[str, Any]) -> None:
        from tqdm import tqdm

        kind = ev.get("event")
        if kind == "resumed":
            self.start = int(ev["step"])
        elif kind == "step":
            if self.bar is None:
                self.bar = tqdm(total=ev["total_steps"], initial=self.start, unit="step", dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}] {postfix}")
            self.bar.update(int(ev["step"]) - self.bar.n)
            eta = ev.get("eta_seconds") or 0
            self.bar.set_postfix_str(f"loss {ev['loss']:.4f}  {ev.get('tokens_per_second', 0):.0f} tok/s  "
                                     f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
            with open(self.steps_file, "a") as f:
                f.write(json.dumps(ev) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_steps(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def run(opts: Options) -> int:
    echo = opts.echo
    t_start = time.monotonic()
    try:
        job = load_spec(opts.spec_path)
    except SpecError as e:
        sys.stderr.write(f"error: {opts.spec_path} is not a valid SFTJob:\n")
        for line in e.errors:
            sys.stderr.write(f"  {line}\n")
        return EXIT_INVALID
    spec, name = job.spec, job.metadata.name
    ns = job.metadata.namespace or "local"
    spec_dir = os.path.dirname(os.path.abspath(opts.spec_path))
    phase = lambda p, msg="": echo(f"[{time.strftime('%H:%M:%S')}] phase {p}" + (f": {msg}" if msg else ""))  # noqa: E731
    phase("Pending", f"SFTJob {ns}/{name} is valid")

    from sftjob_trainer import artifacts, model_cache
    from sftjob_trainer.exit_codes import EVAL_GATE_FAILED, TrainerError
    from sftjob_trainer.storage import open_store

    s3env: dict[str, str] = {}
    server = None
    try:
        uri = spec.output.uri
        if opts.output:
            uri = os.path.abspath(opts.output)
        elif opts.embedded_s3:
            from .embedded_s3 import EmbeddedS3

            server = EmbeddedS3().start()
            if not uri.startswith("s3://"):
                uri = "s3://sftjob/" + uri.strip("./").strip("/")
            server.ensure_bucket(uri[5:].split("/")[0])
            s3env = server.env()
            echo(f"embedded S3 (SeaweedFS) at {server.endpoint_url}, data in {server.root}")
        elif not uri.startswith("s3://"):
            uri = os.path.abspath(uri)
        if spec.output.endpoint and not server:
            s3env["AWS_ENDPOINT_URL"] = spec.output.endpoint
        if spec.output.region:
            s3env.setdefault("AWS_DEFAULT_REGION", spec.output.region)
        os.environ.update(s3env)
        root = f"{uri.rstrip('/')}/{ns}/{name}"
        store = open_store(root)

        try:
            model_dir = _local(spec.model.uri, spec_dir)
            if model_cache.is_bare_name(model_dir) and not model_cache.is_prepared(model_dir):
                phase("Pending", f"preparing model {model_dir} (one-time conversion into {model_cache.cache_root()})")
            model_dir = model_cache.resolve(model_dir)
        except TrainerError as e:
            phase("Failed", f"ModelNotFound: {e}")
            return e.exit_code
        work = opts.work_dir or os.path.join(os.path.expanduser("~/.cache/sftjob/runs"), ns, name)
        if opts.fresh:
            artifacts.delete_key(store, artifacts.MANIFEST)  # first: the run stops looking complete
            for prefix in artifacts.LAYOUT:
                store.delete_prefix(prefix)
            shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work, exist_ok=True)
        cfg = render_local_config(job, spec_dir, root, work, model_dir)
        cfg_path = os.path.join(work, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=1)
        echo(f"artifacts: {root}/   logs and config: {work}/")

        nproc = spec.world_size()
        env = child_env(nproc, s3env)
        py = [sys.executable, "-m", "sftjob_trainer"]
        timings: dict[str, float] = {}
        steps_file = os.path.join(work, "steps.jsonl")

        def keys(prefix: str) -> list[str]:
            return store.list(prefix)

        if artifacts.exists(store, artifacts.MANIFEST):
            echo("this run already completed (manifest.json present); use --fresh to start over")
        else:
            trained = artifacts.exists(store, f"{artifacts.TRAIN}/summary.json") and bool(
                keys(artifacts.ADAPTER) or keys(artifacts.MODEL))
            if trained:
                phase("Training", "already done (train/summary.json present): skipped")
            else:
                from sftjob_trainer import checkpoint

                resume = checkpoint.newest_complete(keys(checkpoint.PREFIX))
                phase("Training", f"{nproc} local rank(s)" + (f", resuming from step {resume}" if resume else ""))
                t0 = time.monotonic()
                prog = Progress(steps_file)
                stage = Stage("train", [*py, "launch", "--nnodes=1", f"--nproc-per-node={nproc}",
                                        "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "train",
                                        "--config", cfg_path], env, os.path.join(work, "train.log"))
                rc, interrupted = stage.run(prog)
                prog.close()
                timings["Training"] = time.monotonic() - t0
                if interrupted:
                    done = checkpoint.newest_complete(keys(checkpoint.PREFIX))
                    echo(f"interrupted: checkpoint {'step-' + str(done) if done else '(none yet)'} saved; "
                         f"run the same command again to resume")
                    return EXIT_INTERRUPTED
                if rc != 0:
                    phase("Failed", f"TrainingFailed (exit code {rc}); last log lines:\n{stage.tail()}")
                    return rc
            if spec.eval.enabled:
                phase("Evaluating", "base model and fine-tuned model on the held-out data")
                t0 = time.monotonic()
                stage = Stage("eval", [*py, "eval", "--config", cfg_path], env, os.path.join(work, "eval.log"))
                rc, interrupted = stage.run(lambda ev: ev.get("event", "").startswith("eval_") and echo(
                    "  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in ev.items() if k != "ts")))
                timings["Evaluating"] = time.monotonic() - t0
                if interrupted:
                    return EXIT_INTERRUPTED
                if rc == EVAL_GATE_FAILED:
                    res = json.loads(store.get_bytes(f"{artifacts.EVAL}/results.json"))
                    phase("Failed", "EvalGateFailed: " + "; ".join(res["failed_gates"]) + " (adapter kept)")
                    print_summary(echo, store, root, timings)
                    return rc
                if rc != 0:
                    phase("Failed", f"EvalFailed (exit code {rc}):\n{stage.tail()}")
                    return rc
            if spec.merge.enabled and spec.method.type != "full":
                phase("Merging", f"adapter into the full-precision base, saved as {spec.merge.dtype}")
                t0 = time.monotonic()
                stage = Stage("merge", [*py, "merge", "--config", cfg_path], env, os.path.join(work, "merge.log"))
                rc, interrupted = stage.run(lambda ev: ev.get("event") == "merge_verified" and echo(
                    f"  merged vs base+adapter: max |logit diff| {ev['merge_fp32']['max_abs_diff']:.2e} (fp32), "
                    f"saved copy rel. error {ev['saved']['rel_l2']:.2e}, top-1 agreement "
                    f"{ev['saved']['top1_agreement']:.3f}"))
                timings["Merging"] = time.monotonic() - t0
                if interrupted:
                    return EXIT_INTERRUPTED
                if rc != 0:
                    phase("Failed", f"MergeFailed (exit code {rc}):\n{stage.tail()}")
                    return rc
            write_report(store, job, opts.spec_path, root, timings, steps_file, cfg)
        phase("Succeeded", f"in {time.monotonic() - t_start:.0f}s")
        print_summary(echo, store, root, timings)
        return 0
    finally:
        if server:
            server.stop()


def _json(store: Any, key: str) -> Any:
    try:
        return json.loads(store.get_bytes(key))
    except Exception:
        return None


def write_report(store: Any, job: SFTJob, spec_path: str, root: str, timings: dict[str, float], steps_file: str,
                 cfg: dict[str, Any]) -> None:
    """report/loss_curve.png + report/report.md, then the manifest again so it lists them (still last)."""
    from sftjob_trainer import artifacts

    results = _json(store, f"{artifacts.EVAL}/results.json")
    summary = _json(store, f"{artifacts.TRAIN}/summary.json")
    merge = _json(store, f"{artifacts.MERGED}/verification.json")
    try:
        samples = [json.loads(x) for x in store.get_bytes(f"{artifacts.EVAL}/samples.jsonl").decode().splitlines()]
    except Exception:
        samples = []
    with tempfile.TemporaryDirectory() as d:
        evals = {}
        if results and (results.get("base") or {}).get("eval_loss") is not None:
            evals = {"eval loss, base": results["base"]["eval_loss"],
                     "eval loss, fine-tuned": results["trained"]["eval_loss"]}
        png = report.loss_curve_png(read_steps(steps_file), os.path.join(d, "loss_curve.png"),
                                    f"SFTJob {job.metadata.name}: training loss", evals)
        md = report.markdown_report(job.metadata.name, spec_path, timings, results, summary, merge, samples,
                                    root, png)
        with open(os.path.join(d, "report.md"), "w") as f:
            f.write(md)
        store.upload_dir(d, "report")
    stages = {"train": "done", "eval": "done" if results else "skipped", "merge": "done" if merge else "skipped"}
    artifacts.write_manifest(store, cfg, stages)


def print_summary(echo: Callable[[str], None], store: Any, root: str, timings: dict[str, float]) -> None:
    from sftjob_trainer import artifacts

    summary = _json(store, f"{artifacts.TRAIN}/summary.json") or {}
    results = _json(store, f"{artifacts.EVAL}/results.json")
    echo("")
    if timings:
        echo(report.render_table(("phase", "wall time"), [(k, f"{v:.0f}s") for k, v in timings.items()]))
        echo("")
    if summary:
        echo(f"training: {summary.get('steps')} steps, {summary.get('tokens')} tokens, "
             f"final train loss {summary.get('final_loss', float('nan')):.4f}")
    if results:
        echo(report.render_table(("held-out metric", "base model", "fine-tuned", "change"),
                                 report.eval_table(results)))
        if results.get("failed_gates"):
            echo("failed gates: " + "; ".join(results["failed_gates"]))
    echo(f"\nartifacts: {root}/  (manifest.json, report/report.md, report/loss_curve.png)")
