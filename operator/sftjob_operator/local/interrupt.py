"""SIGINT (Ctrl-C) and SIGTERM to `sftjob run`: stop the stage that runs, keep what it saved, say how to resume.

The handler only records the signal and passes SIGTERM on to the running stage: the run itself checks
`Interrupt.signum` between its steps, so an interrupt never lands in the middle of the runner's own store
writes (deleting for --fresh, the report, the manifest). The stage gets a bounded time to exit (the train
stage finishes its step and saves a checkpoint, as on a pod's SIGTERM), then its process group is killed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention for "ended by signal N": 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies do not count: they hold no memory or ports)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except OSError:
            continue  # it ended meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def kill_group(pid: int, wait_s: float = 5.0) -> None:
    """SIGKILL the process group a stage leads (start_new_session): it and whatever it started; then wait
    (bounded) until none of them runs. SIGKILL lands asynchronously: on a loaded machine a killed worker
    still ran when `sftjob run` had returned, holding its memory and ports for a moment."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while group_running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


class Interrupt:
    """The first signal is remembered and sent on, as SIGTERM, to the running stage (for the train stage that
    is `sftjob_trainer launch`, which passes it to the workers themselves); the stage is killed if it has not
    exited `grace_s` later. A second signal kills the stage at once."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.killed = ""  # why the stage's process group was killed, if it was
        self._child: subprocess.Popen[Any] | None = None
        self.sent = False  # SIGTERM went to the stage that ran (or runs)
        self._timer: threading.Timer | None = None

    def install(self) -> Callable[[], None]:
        """Take over SIGINT and SIGTERM (also when the parent left SIGINT ignored, as `cmd &` in a script
        does: a run must stop on either); returns the function that puts the old handlers back."""
        old = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self._stop_child()
        else:
            self._kill_child(f"a second {signal.Signals(signum).name} came")

    def _stop_child(self) -> None:
        child = self._child
        if child is None or self.sent:
            return
        self.sent = True
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        self._timer = threading.Timer(
            self.grace_s, self._kill_child, [f"it did not exit within {self.grace_s:.0f}s"]
        )
        self._timer.daemon = True
        self._timer.start()

    def _kill_child(self, why: str) -> None:
        child = self._child
        if child is not None and child.returncode is None:  # not reaped: the group's id is still its pid
            self.killed = why
            kill_group(child.pid)  # also what it left running when it exited itself (they hold its stdout)

    @contextlib.contextmanager
    def watching(self, child: subprocess.Popen[Any]) -> Iterator[None]:
        """While the body reads `child`'s output (a session leader), signals reach it; at the end, wait for
        it to exit and kill whatever it left in its group (a worker that outlived its launcher would hold
        memory and ports). The caller then reaps it (`child.wait()`)."""
        self._child, self.sent = child, False
        ok = False
        try:
            if self.signum is not None:  # arrived while it was starting
                self._stop_child()
            yield
            ok = True
        finally:
            if not ok and child.returncode is None:  # the body failed: do not leave the stage running
                kill_group(child.pid)
            if child.returncode is None:  # not reaped by the body (which would free its pid for reuse)
                with contextlib.suppress(ChildProcessError):  # signals are still passed on meanwhile
                    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
                kill_group(child.pid)
            if self._timer is not None:
                self._timer.cancel()
            self._child, self._timer = None, None


def resume_command(spec_path: str, output: str | None, embedded_s3: bool, work_dir: str | None) -> str:
    """The command that resumes this run: the same one, without --fresh."""
    argv = ["sftjob", "run", spec_path]
    argv += ["--output", output] if output else []
    argv += ["--embedded-s3"] if embedded_s3 else []
    argv += ["--work-dir", work_dir] if work_dir else []
    return shlex.join(argv)


def stop_lines(
    signum: int,
    phase: str,
    stage: str | None,
    killed: str,
    done: Sequence[str],
    todo: Sequence[str],
    checkpoint: int | None,
    command: str,
) -> list[str]:
    """What `sftjob run` prints when it stops on a signal: what was stopped, what is saved, how to resume.
    `stage` is the stage that was running (`killed`: why it had to be killed), `done`/`todo` the stages that
    completed / are left, `checkpoint` the newest complete one."""
    how = "no stage was running"
    if stage:
        how = f"the {stage} stage was killed ({killed})" if killed else f"the {stage} stage stopped"
    lines = [f"interrupted by {signal.Signals(signum).name} in phase {phase}: {how}"]
    lines.append(
        f"saved: completed stage(s) {', '.join(done)} (skipped when resumed)"
        if done
        else "no stage completed yet"
    )
    looping = next((s for s in todo if s in ("train", "align")), None)  # the stages with checkpoints
    if looping:
        what = "training" if looping == "train" else "alignment"
        lines.append(
            f"checkpoint step-{checkpoint} saved ({what} resumes from it)"
            if checkpoint
            else f"no checkpoint saved yet ({what} starts from step 0)"
        )
    if todo:
        lines.append(f"to resume, run the same command (it runs {', '.join(todo)}): {command}")
    else:
        lines.append(f"every stage had completed: nothing to redo ({command} prints the summary)")
    return lines
