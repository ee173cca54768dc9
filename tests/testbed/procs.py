"""Process helpers shared by the test bed: free loopback ports, logged child processes, bounded waits."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
LOOPBACK = "127.0.0.1"

# Every Proc started in this interpreter, so a pytest hook can attach their log tails to a failure.
RUNNING: list[Proc] = []


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so a killed pytest leaves no servers behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def bed_index() -> int:
    """Which of the machine's test beds this process runs: pytest-xdist worker gwN -> N, else 0."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


# Each test bed takes its ports from a block of its own below the kernel's ephemeral range (32768 and up
# here), so neither another worker nor any outgoing connection takes a port between this check and the
# server's bind: with the OS picking (bind to port 0), four workers made that race real (Kueue exited with
# "bind: address already in use").
PORT_BASE, PORT_BLOCK = 10000, 2000
_handed_out = itertools.count()


def free_port() -> int:
    """A free TCP port on loopback from this bed's block, never the same twice in a row of PORT_BLOCK."""
    first = PORT_BASE + bed_index() * PORT_BLOCK
    assert first + PORT_BLOCK <= 32768, f"test bed {bed_index()} has no port block below the ephemeral range"
    for _ in range(PORT_BLOCK):
        port = first + next(_handed_out) % PORT_BLOCK
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue  # in use (or lingering): the next one
            return port
    raise RuntimeError(f"no free loopback port in {first}-{first + PORT_BLOCK - 1}")


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; raise TimeoutError naming `what` otherwise.

    Exceptions from `check` count as "not yet" (servers refuse connections while starting), and the last
    one is put in the timeout message.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as e:  # any failure means "not ready yet"
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last result: {last!r}")
        time.sleep(interval)


class Proc:
    """A child process with its own log file, stopped by PID (its own process group)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"$ {' '.join(argv)}\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # own group: stop() signals it without touching pytest
            preexec_fn=_die_with_parent,
        )
        RUNNING.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> bool:
        """For wait_until: fail fast with the log tail when the process died during start-up."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
        return True

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL what is left."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        if self in RUNNING:
            RUNNING.remove(self)
