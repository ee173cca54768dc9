"""The `sftjob` command.

sftjob run SPEC.yaml [--output DIR] [--embedded-s3] [--fresh]   the pipeline on this machine
sftjob model prepare NAME [--force]                              fill the local model cache
sftjob model list                                                known and prepared models
sftjob operator [flags]                                          the Kubernetes operator
sftjob status|logs|artifacts NAME [-n NS]                        a run in the cluster (cluster_cli.py)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence

from .cluster_cli import add_commands as add_cluster_commands


def _run(a: argparse.Namespace) -> int:
    from .local.runner import Options, run

    return run(
        Options(
            spec_path=a.spec, output=a.output, embedded_s3=a.embedded_s3, work_dir=a.work_dir, fresh=a.fresh
        )
    )


def _model(a: argparse.Namespace) -> int:
    # The model cache is the trainer's (it needs the ML stack to convert models): run its entry point.
    argv = [a.model_cmd] + ([a.name, *(["--force"] if a.force else [])] if a.model_cmd == "prepare" else [])
    return subprocess.call([sys.executable, "-m", "sftjob_trainer", "model", *argv])


def _operator(argv: Sequence[str]) -> int:
    from .main import run

    return int(run(list(argv)) or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sftjob", description="Supervised fine-tuning jobs, on Kubernetes or here."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run an SFTJob manifest on this machine: train -> eval -> merge")
    r.add_argument("spec", help="SFTJob YAML (the same file you would kubectl apply)")
    r.add_argument("--output", help="local directory for artifacts (overrides spec.output.uri)")
    r.add_argument(
        "--embedded-s3",
        action="store_true",
        help="start a local SeaweedFS S3 server and write the artifacts there",
    )
    r.add_argument("--work-dir", help="logs, rendered config, staging (default ~/.cache/sftjob/runs/NS/NAME)")
    r.add_argument("--fresh", action="store_true", help="delete this run's earlier artifacts and start over")
    r.set_defaults(func=_run)
    m = sub.add_parser("model", help="the local model cache that bare spec.model.uri names resolve to")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    mp = msub.add_parser("prepare", help="download/convert a known model into the cache (idempotent)")
    mp.add_argument("name")
    mp.add_argument("--force", action="store_true", help="rebuild even if present")
    msub.add_parser("list", help="known models and where they are")
    m.set_defaults(func=_model)
    sub.add_parser(
        "operator", help="run the Kubernetes operator (flags: sftjob operator --help)", add_help=False
    )
    add_cluster_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "operator":
        return _operator(args[1:])
    a = parser().parse_args(args)
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
