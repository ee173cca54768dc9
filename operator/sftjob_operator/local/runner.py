"""`sftjob run SPEC.yaml`: validate with the API models, then run `stages(spec)` on this machine.

Each stage is the trainer image's own entry point run as a child process, exactly as the operator runs it
in a Job: curate (when spec.dataset.curation is set), train under torchrun (`python -m sftjob_trainer launch`, nodes x max(gpusPerNode, 1) local ranks),
then `python -m sftjob_trainer eval` and `... merge` with the same trainer config. The final stage writes
manifest.json, as in a cluster; `sftjob run` then adds report/ and writes the manifest again (still last).
Phases and reasons are printed as the operator would set them in status. Ctrl-C sends SIGTERM to the
trainer, which finishes its step, saves a checkpoint and exits; running the same command again resumes from
it (a finished training is skipped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from sftjob_api import Layout, Phase, Reason, SFTJob, SpecError, Stage, final_stage, parse_sftjob, stages
from sftjob_api.exit_codes import ExitCode
from sftjob_api.manifest import close_run
from sftjob_api.ports import free_port
from sftjob_api.spec import CACHE_NAME, OutputSpec, SFTJobSpec
from sftjob_api.storage import Store, open_store
from sftjob_api.trainer_config import RuntimeSection, TrainerConfig

from ..render.trainer_config import trainer_config
from . import report
from .process import ChildProcess, Progress, child_env, read_steps

EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
PHASE_OF = {
    Stage.CURATE: Phase.CURATING,
    Stage.TRAIN: Phase.TRAINING,
    Stage.EVAL: Phase.EVALUATING,
    Stage.MERGE: Phase.MERGING,
}
FAILED_REASON = {
    Stage.CURATE: Reason.CURATE_FAILED,
    Stage.TRAIN: Reason.TRAINING_FAILED,
    Stage.EVAL: Reason.EVAL_FAILED,
    Stage.MERGE: Reason.MERGE_FAILED,
}


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


def local_spec(spec: SFTJobSpec, spec_dir: str, output: OutputSpec, model_dir: str) -> SFTJobSpec:
    """The spec with this machine's paths: relative inputs resolved against the manifest's directory, the
    model resolved to a directory, the output where this run writes."""
    ds = spec.dataset
    merge_uri = spec.merge.uri
    return spec.model_copy(
        update={
            "model": spec.model.model_copy(
                update={
                    "uri": model_dir,
                    "tokenizer": spec.model.tokenizer and _local(spec.model.tokenizer, spec_dir),
                }
            ),
            "dataset": ds.with_uris(lambda u: _local(u, spec_dir)),
            "output": output,
            "merge": spec.merge.model_copy(
                update={
                    "uri": merge_uri
                    if not merge_uri or merge_uri.startswith("s3://")
                    else os.path.abspath(merge_uri)
                }
            ),
        }
    )


def resolve_model(uri: str, spec_dir: str, echo: Callable[[str], None]) -> str:
    """A directory for spec.model.uri; a model-cache name is resolved (and prepared once) by the trainer."""
    uri = _local(uri, spec_dir)
    if not re.fullmatch(CACHE_NAME, uri) or os.path.exists(uri):
        return uri
    echo(f"  resolving model {uri} (prepared into the model cache the first time)")
    proc = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "model", "resolve", uri], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise LookupError((proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1])
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class Run:
    """One `sftjob run`: its config, store, work directory and what each stage took."""

    cfg: TrainerConfig
    cfg_path: str
    store: Store
    work: str
    env: dict[str, str]
    echo: Callable[[str], None]
    timings: dict[str, float] = field(default_factory=dict)

    def phase(self, p: Phase, msg: str = "") -> None:
        self.echo(f"[{time.strftime('%H:%M:%S')}] phase {p}" + (f": {msg}" if msg else ""))

    def child(
        self, stage: Stage, argv: list[str], on_event: Callable[[dict[str, Any]], Any]
    ) -> tuple[int, bool]:
        proc = ChildProcess(
            stage,
            [sys.executable, "-m", "sftjob_trainer", *argv],
            self.env,
            os.path.join(self.work, f"{stage}.log"),
        )
        t0 = time.monotonic()
        rc, interrupted = proc.run(on_event)
        self.timings[PHASE_OF[stage]] = time.monotonic() - t0
        if rc != 0 and not interrupted and rc != ExitCode.EVAL_GATE_FAILED:
            self.phase(Phase.FAILED, f"{FAILED_REASON[stage]} (exit code {rc}): {proc.failure()}")
        return rc, interrupted

    @property
    def steps_file(self) -> str:
        return os.path.join(self.work, "steps.jsonl")


def _print_curate_event(r: Run, ev: dict[str, Any]) -> None:
    if ev.get("event") == "curated":
        r.echo(
            f"  {ev.get('train_examples')} training / {ev.get('eval_examples')} held-out examples, dropped "
            f"{ev.get('dropped') or 'nothing'}, {'reused' if ev.get('reused') else 'curated'} in "
            f"{ev.get('seconds')}s, shards for {ev.get('world_size')} rank(s)"
        )


def run_curate(r: Run) -> int:
    r.phase(Phase.CURATING, "reading, curating and tokenizing the sources once")
    rc, interrupted = r.child(
        Stage.CURATE, ["curate", "--config", r.cfg_path], lambda ev: _print_curate_event(r, ev)
    )
    return EXIT_INTERRUPTED if interrupted else rc


def run_train(r: Run) -> int:
    weights = Layout.weights(r.cfg.method.type)
    if r.store.exists(Layout.TRAIN_SUMMARY) and r.store.list(weights):
        r.phase(Phase.TRAINING, f"already done ({Layout.TRAIN_SUMMARY} present): skipped")
        return 0
    nproc = r.cfg.world_size()
    resume = Layout.newest_checkpoint(r.store.list(Layout.CHECKPOINTS))
    r.phase(Phase.TRAINING, f"{nproc} local rank(s)" + (f", resuming from step {resume}" if resume else ""))
    prog = Progress(r.steps_file)
    argv = ["launch", "--nnodes=1", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1"]
    argv += [f"--master-port={free_port()}", "train", "--config", r.cfg_path]
    rc, interrupted = r.child(Stage.TRAIN, argv, prog)
    prog.close()
    if interrupted:
        done = Layout.newest_checkpoint(r.store.list(Layout.CHECKPOINTS))
        r.echo(
            f"interrupted: checkpoint {'step-' + str(done) if done else '(none yet)'} saved; "
            "run the same command again to resume"
        )
        return EXIT_INTERRUPTED
    return rc


def _print_eval_event(r: Run, ev: dict[str, Any]) -> None:
    if str(ev.get("event", "")).startswith("eval_"):
        fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items() if k != "ts")
        r.echo("  " + " ".join(fields))


def run_eval(r: Run) -> int:
    r.phase(Phase.EVALUATING, "base model and fine-tuned model on the held-out data")
    rc, interrupted = r.child(
        Stage.EVAL, ["eval", "--config", r.cfg_path], lambda ev: _print_eval_event(r, ev)
    )
    if interrupted:
        return EXIT_INTERRUPTED
    if rc == ExitCode.EVAL_GATE_FAILED:
        res = r.store.read_json(Layout.EVAL_RESULTS) or {}
        r.phase(
            Phase.FAILED,
            f"{Reason.GATE_FAILED}: " + "; ".join(res.get("failed_gates", [])) + " (adapter kept)",
        )
        print_summary(r)
    return rc


def _print_merge_event(r: Run, ev: dict[str, Any]) -> None:
    if ev.get("event") == "merge_verified":
        r.echo(
            f"  merged vs base+adapter: max |logit diff| {ev['merge_fp32']['max_abs_diff']:.2e} (fp32), "
            f"saved copy rel. error {ev['saved']['rel_l2']:.2e}, top-1 agreement "
            f"{ev['saved']['top1_agreement']:.3f}"
        )


def run_merge(r: Run) -> int:
    r.phase(Phase.MERGING, f"adapter into the full-precision base, saved as {r.cfg.merge.dtype}")
    rc, interrupted = r.child(
        Stage.MERGE, ["merge", "--config", r.cfg_path], lambda ev: _print_merge_event(r, ev)
    )
    return EXIT_INTERRUPTED if interrupted else rc


RUNNERS: dict[Stage, Callable[[Run], int]] = {
    Stage.CURATE: run_curate,
    Stage.TRAIN: run_train,
    Stage.EVAL: run_eval,
    Stage.MERGE: run_merge,
}


def prepare(opts: Options, job: SFTJob, server: Any) -> Run:
    """Output location, model, config file and store of this run (raises LookupError: model not found)."""
    spec, name = job.spec, job.metadata.name
    ns = job.metadata.namespace or "local"
    spec_dir = os.path.dirname(os.path.abspath(opts.spec_path))
    output = spec.output
    s3env: dict[str, str] = {}
    if opts.output:
        output = output.model_copy(update={"uri": os.path.abspath(opts.output)})
    elif server is not None:
        uri = (
            output.uri
            if output.uri.startswith("s3://")
            else "s3://sftjob/" + output.uri.strip("./").strip("/")
        )
        server.ensure_bucket(uri[5:].split("/")[0])
        output = output.model_copy(update={"uri": uri, "endpoint": server.endpoint_url, "path_style": True})
        s3env = server.env()
        opts.echo(f"embedded S3 (SeaweedFS) at {server.endpoint_url}, data in {server.root}")
    elif not output.uri.startswith("s3://"):
        output = output.model_copy(update={"uri": os.path.abspath(output.uri)})
    os.environ.update(s3env)  # credentials for this process's own store too

    model_dir = resolve_model(spec.model.uri, spec_dir, opts.echo)
    work = opts.work_dir or os.path.join(os.path.expanduser("~/.cache/sftjob/runs"), ns, name)
    cfg = trainer_config(ns, name, local_spec(spec, spec_dir, output, model_dir))
    cfg.run.model_uri = _local(spec.model.uri, spec_dir)  # the spec's reference, not the resolved directory
    cfg = cfg.model_copy(update={"runtime": RuntimeSection(metrics_port=0, work_dir=work)})
    store = open_store(cfg.run.output_root, cfg.output)
    if opts.fresh:
        store.delete(Layout.MANIFEST)  # first: the run stops looking complete
        for prefix in Layout.PREFIXES:
            store.delete_prefix(prefix)
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    cfg_path = os.path.join(work, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg.model_dump(mode="json", exclude_none=True), f, indent=1)
    opts.echo(f"artifacts: {cfg.run.output_root}   logs and config: {work}/")
    return Run(cfg, cfg_path, store, work, child_env(cfg.world_size(), s3env), opts.echo)


def run(opts: Options) -> int:
    t_start = time.monotonic()
    try:
        job = load_spec(opts.spec_path)
    except SpecError as e:
        sys.stderr.write(f"error: {opts.spec_path} is not a valid SFTJob:\n")
        for line in e.errors:
            sys.stderr.write(f"  {line}\n")
        return EXIT_INVALID
    ns = job.metadata.namespace or "local"
    opts.echo(
        f"[{time.strftime('%H:%M:%S')}] phase {Phase.PENDING}: SFTJob {ns}/{job.metadata.name} is valid"
    )
    server = None
    try:
        if opts.embedded_s3 and not opts.output:
            from .embedded_s3 import EmbeddedS3

            server = EmbeddedS3().start()
        try:
            r = prepare(opts, job, server)
        except LookupError as e:
            opts.echo(f"[{time.strftime('%H:%M:%S')}] phase {Phase.FAILED}: {Reason.MODEL_NOT_FOUND}: {e}")
            return int(ExitCode.PERMANENT)
        if r.store.exists(Layout.MANIFEST):
            r.echo("this run already completed (manifest.json present); use --fresh to start over")
        else:
            for stage in stages(r.cfg):
                rc = RUNNERS[stage](r)
                if rc != 0:
                    return rc
            write_report(r, job, opts.spec_path)
        r.phase(Phase.SUCCEEDED, f"in {time.monotonic() - t_start:.0f}s")
        print_summary(r)
        return 0
    finally:
        if server:
            server.stop()


def write_report(r: Run, job: SFTJob, spec_path: str) -> None:
    """report/loss_curve.png + report/report.md, then the manifest again so it lists them (still last)."""
    store = r.store
    results = store.read_json(Layout.EVAL_RESULTS)
    try:
        samples = [json.loads(x) for x in store.get_bytes(Layout.EVAL_SAMPLES).decode().splitlines()]
    except Exception:
        samples = []
    with tempfile.TemporaryDirectory() as d:
        evals = {}
        if results and (results.get("base") or {}).get("eval_loss") is not None:
            evals = {
                "eval loss, base": results["base"]["eval_loss"],
                "eval loss, fine-tuned": results["trained"]["eval_loss"],
            }
        png = report.loss_curve_png(
            read_steps(r.steps_file),
            os.path.join(d, "loss_curve.png"),
            f"SFTJob {job.metadata.name}: training loss",
            evals,
        )
        md = report.markdown_report(
            job.metadata.name,
            spec_path,
            r.timings,
            results,
            store.read_json(Layout.TRAIN_SUMMARY),
            store.read_json(Layout.MERGE_VERIFICATION),
            samples,
            r.cfg.run.output_root,
            png,
        )
        with open(os.path.join(d, "report.md"), "w") as f:
            f.write(md)
        store.upload_dir(d, Layout.REPORT)
    cfg = r.cfg
    close_run(store, cfg, final_stage(cfg))


def print_summary(r: Run) -> None:
    summary = r.store.read_json(Layout.TRAIN_SUMMARY) or {}
    results = r.store.read_json(Layout.EVAL_RESULTS)
    echo = r.echo
    echo("")
    if r.timings:
        echo(report.render_table(("phase", "wall time"), [(k, f"{v:.0f}s") for k, v in r.timings.items()]))
        echo("")
    for line in report.data_lines(r.store.read_json(Layout.DATA_REPORT)):
        echo(line)
    if summary:
        echo(
            f"training: {summary.get('steps')} steps, {summary.get('tokens')} tokens, "
            f"final train loss {summary.get('final_loss', float('nan')):.4f}"
        )
    if results:
        echo(
            report.render_table(
                ("held-out metric", "base model", "fine-tuned", "change"), report.eval_table(results)
            )
        )
        if results.get("failed_gates"):
            echo("failed gates: " + "; ".join(results["failed_gates"]))
    if r.cfg.tracking and r.cfg.tracking.mlflow:
        echo(report.tracking_line(r.store.read_json(Layout.MLFLOW_RUN), r.cfg.tracking.mlflow.tracking_uri))
    echo(f"\nartifacts: {r.cfg.run.output_root}  (manifest.json, report/report.md, report/loss_curve.png)")
