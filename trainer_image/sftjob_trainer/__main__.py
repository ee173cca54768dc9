"""Entry point: `python -m sftjob_trainer {curate,train,align,eval,merge} --config PATH` (or $SFTJOB_CONFIG),
`python -m sftjob_trainer launch [torchrun args] {train,align} --config PATH`, and
`python -m sftjob_trainer model {list,prepare NAME [--force],resolve URI}` (the model cache; `sftjob model`).

Exit codes are a contract (sftjob_api.exit_codes, docs/trainer.md). torchrun reports any failed worker as
exit 1, which would turn a permanent error into a retry; `launch` runs torchrun and restores the real code
from files the workers leave in $SFTJOB_EXIT_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import traceback

from sftjob_api import Stage
from sftjob_api.exit_codes import ExitCode, TrainerError
from sftjob_api.trainer_config import TrainerConfig

from . import model_cache
from .config import load_config
from .extensions import seed_extensions
from .metrics import log_json

STAGES = tuple(Stage)


def _record_exit(code: int, message: str, termination_log: str | None) -> None:
    d = os.environ.get("SFTJOB_EXIT_DIR")
    if d:
        with open(os.path.join(d, f"rank-{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(f"{code}\n{message}\n")
    if termination_log and code != ExitCode.OK and os.environ.get("RANK", "0") == "0":
        try:
            with open(termination_log, "w") as f:
                f.write(message[-4000:])  # Kubernetes keeps at most 4 KiB
        except OSError:
            pass


def unused_optional_packages(cfg: TrainerConfig) -> list[str]:
    """Installed packages this run does not use that other libraries import just because they are installed:
    peft and transformers import bitsandbytes, which compiles its CPU ops with torch.compile and so loads
    torch's whole compiler stack (~3 CPU-s per process); DeepSpeed's autotuner imports MLflow (~1.4 s).
    Every rank and stage pays that at start-up, so a run that needs neither starts without them."""
    unused = []
    if cfg.method.type != "qlora" and cfg.training.optimizer != "adamw_8bit":
        unused.append("bitsandbytes")
    if cfg.tracking is None or cfg.tracking.mlflow is None:
        unused.append("mlflow")
    return unused


def hide_packages(names: list[str]) -> None:
    """None in sys.modules makes `import name` raise ImportError and importlib's find_spec return None, so
    libraries take their not-installed path (they all treat these packages as optional)."""
    for name in names:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def run_stage(stage: Stage, config_path: str | None) -> int:
    term_log = os.environ.get("SFTJOB_TERMINATION_LOG")
    try:
        cfg = load_config(config_path)
        term_log = cfg.runtime.termination_log or term_log
        seed_extensions(
            os.environ.get("SFTJOB_TORCH_EXTENSIONS_SEED"), os.environ.get("TORCH_EXTENSIONS_DIR")
        )
        # Imported here: the torch stack loads only in the process that runs a stage (never in `launch`).
        hide_packages(unused_optional_packages(cfg))
        if stage == Stage.CURATE:
            from .curate_stage import main as entry
        elif stage == Stage.TRAIN:
            from .train import train as entry
        elif stage == Stage.ALIGN:
            from .align_stage import main as entry
        elif stage == Stage.EVAL:
            from .eval_stage import main as entry
        else:
            from .merge_stage import main as entry
        code = int(entry(cfg))
        _record_exit(code, "ok", term_log)
        return code
    except TrainerError as e:
        msg = f"{type(e).__name__}: {e}"
        log_json("error", stage=stage, exit_code=e.exit_code, message=str(e), kind=type(e).__name__)
        sys.stderr.write(msg + "\n")
        _record_exit(e.exit_code, msg, term_log)
        return int(e.exit_code)
    except Exception as e:
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}"
        log_json("error", stage=stage, exit_code=ExitCode.RETRYABLE, message=msg, kind="crash")
        _record_exit(ExitCode.RETRYABLE, msg, term_log)
        return int(ExitCode.RETRYABLE)


def model(argv: list[str]) -> int:
    """The model cache: list the known models, prepare one, or resolve a spec.model.uri to a directory."""
    p = argparse.ArgumentParser(prog="python -m sftjob_trainer model")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="convert a known model into the cache (idempotent)")
    prep.add_argument("name")
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    sub.add_parser("list", help="known models and where they are")
    res = sub.add_parser("resolve", help="print the directory of a cache name (preparing it when known)")
    res.add_argument("uri")
    a = p.parse_args(argv)
    if a.cmd == "list":
        for name, km in sorted(model_cache.KNOWN.items()):
            state = model_cache.model_dir(name) if model_cache.is_prepared(name) else "not prepared"
            print(f"{name:28s} {state}\n{'':28s} {km.description}")
        return int(ExitCode.OK)
    try:
        print(
            model_cache.prepare(a.name, force=a.force) if a.cmd == "prepare" else model_cache.resolve(a.uri)
        )
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    return int(ExitCode.OK)


def combine_exit_codes(launcher_rc: int, worker_codes: list[int]) -> int:
    """Permanent beats everything (the most specific first); then success; then preemption; else the
    launcher's (retryable) code."""
    for permanent in (ExitCode.SPEC_CHANGED, ExitCode.PERMANENT):
        if permanent in worker_codes:
            return int(permanent)
    if launcher_rc == 0:
        return int(ExitCode.OK)
    if ExitCode.PREEMPTED in worker_codes or launcher_rc in (-signal.SIGTERM, 128 + signal.SIGTERM):
        return int(ExitCode.PREEMPTED)
    rc = launcher_rc if launcher_rc > 0 else 128 - launcher_rc
    return rc if rc not in (ExitCode.PERMANENT, ExitCode.SPEC_CHANGED) else int(ExitCode.RETRYABLE)


def _children(parent: int) -> list[int]:
    """PIDs whose parent is `parent` (torchrun's workers are its direct children)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:  # ppid follows the (command name)
            found.append(int(entry))
    return found


def _forward(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Pass SIGTERM/SIGINT to the workers themselves, so they checkpoint within the pod's grace period:
    torchrun, when it is the one signalled, gives its workers only 30 s before SIGKILL (PContext.close's
    default) — too little for a checkpoint on a loaded node (found on the test bed's real node)."""
    workers = _children(proc.pid)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    if not workers:
        proc.send_signal(sig)


def outside_group(torchrun_args: list[str]) -> str | None:
    """Why this pod has no rank to run (None: it has): its node rank is not below the group's size. A group
    Kueue admitted with more pods than the largest allowed size uses gets those extra pods, which end with 0
    (the operator's render/admission.py)."""
    opts = dict(a.removeprefix("--").split("=", 1) for a in torchrun_args if a.startswith("--") and "=" in a)
    nnodes, rank = opts.get("nnodes", ""), opts.get("node-rank", "")
    if nnodes.isdigit() and rank.isdigit() and int(rank) >= int(nnodes):
        return f"node rank {rank} is outside the group of {nnodes} node(s): nothing to run"
    return None


def launch(argv: list[str]) -> int:
    split_at = next((i for i, a in enumerate(argv) if a in STAGES), None)
    if split_at is None:
        sys.stderr.write("usage: python -m sftjob_trainer launch [torchrun args] train --config PATH\n")
        return int(ExitCode.PERMANENT)
    idle = outside_group(argv[:split_at])
    if idle is not None:
        print(idle, flush=True)
        return int(ExitCode.OK)
    with tempfile.TemporaryDirectory(prefix="sftjob-exit-") as d:
        env = {**os.environ, "SFTJOB_EXIT_DIR": d}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *argv[:split_at],
            "--module",
            "sftjob_trainer",
            *argv[split_at:],
        ]
        proc = subprocess.Popen(cmd, env=env)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: _forward(proc, s))
        rc = proc.wait()
        codes, errors = [], []
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name)) as f:
                first = f.readline().strip()
                if first.lstrip("-").isdigit():
                    codes.append(int(first))
                    if int(first) != ExitCode.OK:
                        errors.append(f.read().strip())
    code = combine_exit_codes(rc, codes)
    if code != ExitCode.OK and errors:
        # the last line of the pod's log (and of `sftjob run`'s stage log) is the trainer's own error,
        # not torch's launcher traceback (ChildFailedError) that precedes it
        sys.stderr.write(f"{argv[split_at]} failed (exit code {code}): {errors[0]}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        return launch(argv[1:])
    if argv and argv[0] == "model":
        return model(argv[1:])
    p = argparse.ArgumentParser(prog="python -m sftjob_trainer")
    p.add_argument("stage", choices=[str(s) for s in STAGES])
    p.add_argument("--config", default=None, help="trainer config file (default: $SFTJOB_CONFIG)")
    a = p.parse_args(argv)
    return run_stage(Stage(a.stage), a.config)


def exit_now_if_failed_in_group(code: int) -> None:
    """A rank of a multi-rank group that failed (e.g. a collective hit runPolicy.collectiveTimeoutSeconds)
    leaves at once: the interpreter's normal teardown destroys the process group, which waits on the gone or
    hung peers again (measured: 15-24 s more after a 20 s collective timeout). Its exit code is already
    recorded (SFTJOB_EXIT_DIR, termination log)."""
    if code != ExitCode.OK and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    rc = main()
    exit_now_if_failed_in_group(rc)
    sys.exit(rc)
