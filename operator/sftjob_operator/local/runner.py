"""`sftjob run SPEC.yaml`: validate with the API models, then run `stages(spec)` on this machine.

Each stage is the trainer image's own entry point run as a child process, exactly as the operator runs it
in a Job, with the arguments its row of sftjob_api.stage_table gives it (stage_run.py): curate (when
spec.dataset.curation is set), train under torchrun (`python -m sftjob_trainer launch`, nodes x
max(gpusPerNode, 1) local ranks), then `python -m sftjob_trainer eval` and `... merge` with the same trainer
config. The final stage writes
manifest.json, as in a cluster; `sftjob run` then adds report/ and writes the manifest again (still last).
Phases and reasons are printed as the operator would set them in status. SIGINT (Ctrl-C) or SIGTERM in any
phase stops the running stage (interrupt.py: the trainer finishes its step and saves a checkpoint), prints
what is saved and exits 130 / 143; the same command resumes: stages that completed are skipped, the
interrupted one runs again (training from the newest complete checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from sftjob_api import Layout, Phase, Reason, SFTJob, SpecError, Stage, parse_sftjob, stages
from sftjob_api.exit_codes import ExitCode
from sftjob_api.layout import RUN_ID
from sftjob_api.spec import CACHE_NAME, OutputSpec, SFTJobSpec
from sftjob_api.storage import open_store
from sftjob_api.trainer_config import RUN_ID_ENV, RuntimeSection

from ..render.objects import TERMINATION_GRACE_SECONDS
from ..render.trainer_config import trainer_config
from .interrupt import Interrupt, exit_code, resume_command, stop_lines
from .process import child_env
from .stage_run import Run, newest_checkpoint, run_stage
from .summary import print_summary, write_report

EXIT_INVALID = 2


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
            "alignment": spec.alignment
            and spec.alignment.model_copy(
                update={"dataset": spec.alignment.dataset.with_uris(lambda u: _local(u, spec_dir))}
            ),
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


def resolve_model(uri: str, spec_dir: str, echo: Callable[[str], None], intr: Interrupt) -> str:
    """A directory for spec.model.uri; a model-cache name is resolved (and prepared once) by the trainer."""
    uri = _local(uri, spec_dir)
    if not re.fullmatch(CACHE_NAME, uri) or os.path.exists(uri):
        return uri
    echo(f"  resolving model {uri} (prepared into the model cache the first time)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftjob_trainer", "model", "resolve", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with intr.watching(proc):
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise LookupError((err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1])
    return out.strip().splitlines()[-1]


def prepare(opts: Options, job: SFTJob, server: Any, intr: Interrupt) -> Run:
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

    model_dir = resolve_model(spec.model.uri, spec_dir, opts.echo, intr)
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
    run_id = local_run_id(work)
    cfg_path = os.path.join(work, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg.model_dump(mode="json", exclude_none=True), f, indent=1)
    opts.echo(f"artifacts: {cfg.run.output_root}   logs and config: {work}/")
    env = child_env(cfg.world_size(), {**s3env, RUN_ID_ENV: run_id})
    return Run(cfg, cfg_path, store, work, env, opts.echo, intr)


def local_run_id(work: str) -> str:
    """This run's identity, kept in its work directory: a rerun of the same manifest continues the same run
    (and its checkpoints); --fresh, or another work directory, starts a new one (docs/recovery.md)."""
    path = os.path.join(work, "run-id")
    if os.path.exists(path):
        with open(path) as f:
            kept = f.read().strip()
        if RUN_ID.match(kept):
            return kept
    run_id = uuid.uuid4().hex
    with open(path, "w") as f:
        f.write(run_id + "\n")
    return run_id


def run(opts: Options) -> int:
    intr = Interrupt(TERMINATION_GRACE_SECONDS)  # the stage gets what a pod's grace period gives it
    restore = intr.install()
    try:
        return _run(opts, intr)
    finally:
        restore()


def _run(opts: Options, intr: Interrupt) -> int:
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
            r = prepare(opts, job, server, intr) if intr.signum is None else None
        except LookupError as e:
            if intr.signum is None:
                opts.echo(
                    f"[{time.strftime('%H:%M:%S')}] phase {Phase.FAILED}: {Reason.MODEL_NOT_FOUND}: {e}"
                )
                return int(ExitCode.PERMANENT)
            r = None
        if r is None or intr.signum is not None:
            return stopped(intr, job, r, opts)
        if r.store.exists(Layout.MANIFEST):
            r.echo("this run already completed (manifest.json present); use --fresh to start over")
        else:
            for stage in stages(r.cfg):
                if intr.signum is None and not r.skip(stage):
                    rc = run_stage(r, stage)
                    if rc != 0 and intr.signum is None:
                        return rc
                if intr.signum is not None and not r.store.exists(Layout.MANIFEST):
                    return stopped(intr, job, r, opts)
            write_report(r, job, opts.spec_path)  # also when a signal came after the final stage: it is quick
        if intr.signum is not None:
            return stopped(intr, job, r, opts)
        r.phase(Phase.SUCCEEDED, f"in {time.monotonic() - t_start:.0f}s")
        print_summary(r)
        return 0
    finally:
        if server:
            server.stop()


def stopped(intr: Interrupt, job: SFTJob, r: Run | None, opts: Options) -> int:
    """After a signal: what was stopped, what is saved, how to resume; 128 + the signal's number."""
    signum = intr.signum or signal.SIGINT
    planned = stages(r.cfg if r else job.spec)
    done = [s for s in planned if r and r.done(s)]
    todo = [str(s) for s in planned if s not in done]
    # the newest checkpoint of the first group stage left to run (train, else align)
    group = next((Stage(s) for s in todo if s in (Stage.TRAIN, Stage.ALIGN)), None)
    newest = newest_checkpoint(r, group) if r and group else None
    running = r.running if r and intr.sent else None
    lines = stop_lines(
        signum,
        r.current if r else Phase.PENDING,
        running,
        intr.killed,
        [str(s) for s in done],
        todo,
        newest,
        resume_command(opts.spec_path, opts.output, opts.embedded_s3, opts.work_dir),
    )
    opts.echo(f"[{time.strftime('%H:%M:%S')}] " + lines[0])
    for line in lines[1:]:
        opts.echo("  " + line)
    return exit_code(signum)
