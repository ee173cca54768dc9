"""The trainer's entry points as child processes of `sftjob run`: environment, Ctrl-C handling, events."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from typing import Any


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


class ChildProcess:
    """A child process whose stdout JSON lines are events; everything else goes to the stage's log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str) -> None:
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_path
        self.error: str | None = None  # the trainer's own one-line error (its `error` event), if it sent one

    def run(self, on_event: Callable[[dict[str, Any]], None]) -> tuple[int, bool]:
        """(exit code, interrupted by Ctrl-C)."""
        interrupted = False
        with open(self.log_path, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                start_new_session=True,
            )  # Ctrl-C reaches us only
            assert proc.stdout is not None
            while True:
                try:
                    for line in proc.stdout:
                        log.write(line)
                        log.flush()
                        if line.startswith("{") and '"event"' in line:
                            with contextlib.suppress(json.JSONDecodeError):
                                ev = json.loads(line)
                                if ev.get("event") == "error" and self.error is None:
                                    self.error = str(ev.get("message") or "")
                                on_event(ev)
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
