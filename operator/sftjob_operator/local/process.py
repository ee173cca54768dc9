"""The trainer's entry points as child processes of `sftjob run`: environment, events, progress."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from .interrupt import Interrupt


def child_env(nproc: int, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if not shutil.which("nvidia-smi"):
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.pop("SFTJOB_CONFIG", None)
    return env


class ChildProcess:
    """A child process whose stdout JSON lines are events; everything else goes to the stage's log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str) -> None:
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_path
        self.error: str | None = None  # the trainer's own one-line error (its `error` event), if it sent one

    def run(self, on_event: Callable[[dict[str, Any]], None], interrupt: Interrupt) -> int:
        """Its exit code. A signal to `sftjob run` meanwhile reaches it through `interrupt`."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                start_new_session=True,
            )  # a terminal's Ctrl-C reaches `sftjob run` only, which decides what the stage gets
            assert proc.stdout is not None
            with interrupt.watching(proc):
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if line.startswith("{") and '"event"' in line:
                        with contextlib.suppress(json.JSONDecodeError):
                            ev = json.loads(line)
                            if ev.get("event") == "error" and self.error is None:
                                self.error = str(ev.get("message") or "")
                            on_event(ev)
            return proc.wait()

    def failure(self) -> str:
        """What to show when it failed: the trainer's error, else the log's last lines (a crash, a signal)."""
        return self.error or f"last log lines:\n{self.tail()}"

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
                self.bar = tqdm(
                    total=ev["total_steps"],
                    initial=self.start,
                    unit="step",
                    dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}] {postfix}",
                )
            self.bar.update(int(ev["step"]) - self.bar.n)
            eta = ev.get("eta_seconds") or 0
            self.bar.set_postfix_str(
                f"loss {ev['loss']:.4f}  {ev.get('tokens_per_second', 0):.0f} tok/s  "
                f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
            )
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
