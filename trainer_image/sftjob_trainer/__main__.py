"""Entry point: `python -m sftjob_trainer {train,eval,merge} --config PATH` (or $SFTJOB_CONFIG), and
`python -m sftjob_trainer launch [torchrun args] train --config PATH`.

Exit codes are a contract (see exit_codes.py and docs/trainer.md). torchrun reports any failed worker as
exit 1, which would turn a permanent error into a retry; `launch` runs torchrun and restores the real code
from files the workers leave in $SFTJOB_EXIT_DIR.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import traceback

from . import exit_codes
from .exit_codes import TrainerError

STAGES = ("train", "eval", "merge")


def _record_exit(code: int, message: str, termination_log: str | None) -> None:
    d = os.environ.get("SFTJOB_EXIT_DIR")
    if d:
        with open(os.path.join(d, f"rank-{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(f"{code}\n{message}\n")
    if termination_log and code != exit_codes.OK and os.environ.get("RANK", "0") == "0":
        try:
            with open(termination_log, "w") as f:
                f.write(message[-4000:])  # Kubernetes keeps at most 4 KiB
        except OSError:
            pass


def run_stage(stage: str, config_path: str | None) -> int:
    from .config import load_config
    from .metrics import log_json

    term_log = os.environ.get("SFTJOB_TERMINATION_LOG")
    try:
        cfg = load_config(config_path)
        term_log = cfg.runtime.termination_log or term_log
        if stage == "train":
            from .train import train

            code = train(cfg)
        else:
            import importlib

            try:
                mod = importlib.import_module(f".{stage}_stage", __package__)
            except ModuleNotFoundError as e:
                raise exit_codes.PermanentError(f"stage {stage!r} is not available in this image") from e
            code = int(mod.main(cfg))
        _record_exit(code, "ok", term_log)
        return code
    except TrainerError as e:
        msg = f"{type(e).__name__}: {e}"
        log_json("error", stage=stage, exit_code=e.exit_code, message=str(e), kind=type(e).__name__)
        sys.stderr.write(msg + "\n")
        _record_exit(e.exit_code, msg, term_log)
        return e.exit_code
    except Exception as e:
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}"
        log_json("error", stage=stage, exit_code=exit_codes.RETRYABLE, message=msg, kind="crash")
        _record_exit(exit_codes.RETRYABLE, msg, term_log)
        return exit_codes.RETRYABLE


def combine_exit_codes(launcher_rc: int, worker_codes: list[int]) -> int:
    """Permanent beats everything; then success; then preemption; else the launcher's (retryable) code."""
    if exit_codes.PERMANENT in worker_codes:
        return exit_codes.PERMANENT
    if launcher_rc == 0:
        return exit_codes.OK
    if exit_codes.PREEMPTED in worker_codes or launcher_rc in (-signal.SIGTERM, 128 + signal.SIGTERM):
        return exit_codes.PREEMPTED
    rc = launcher_rc if launcher_rc > 0 else 128 - launcher_rc
    return rc if rc != exit_codes.PERMANENT else exit_codes.RETRYABLE


def launch(argv: list[str]) -> int:
    split_at = next((i for i, a in enumerate(argv) if a in STAGES), None)
    if split_at is None:
        sys.stderr.write("usage: python -m sftjob_trainer launch [torchrun args] train --config PATH\n")
        return exit_codes.PERMANENT
    with tempfile.TemporaryDirectory(prefix="sftjob-exit-") as d:
        env = {**os.environ, "SFTJOB_EXIT_DIR": d}
        cmd = [sys.executable, "-m", "torch.distributed.run", *argv[:split_at], "--module", "sftjob_trainer",
               *argv[split_at:]]
        proc = subprocess.Popen(cmd, env=env)
        # forward SIGTERM/SIGINT so workers can checkpoint within the grace period
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        rc = proc.wait()
        codes = []
        for name in os.listdir(d):
            with open(os.path.join(d, name)) as f:
                first = f.readline().strip()
                if first.lstrip("-").isdigit():
                    codes.append(int(first))
    return combine_exit_codes(rc, codes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        return launch(argv[1:])
    p = argparse.ArgumentParser(prog="python -m sftjob_trainer")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", default=None, help="trainer config file (default: $SFTJOB_CONFIG)")
    a = p.parse_args(argv)
    return run_stage(a.stage, a.config)


if __name__ == "__main__":
    sys.exit(main())
