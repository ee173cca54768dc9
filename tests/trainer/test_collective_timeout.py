"""A rank whose peer vanished must not linger: two torchrun agents (--nnodes=2, one worker each, gloo on
loopback) as two pods would run them; one node is frozen (SIGSTOP: a node lost without closing its
connections) or killed (SIGKILL) mid-run, and the survivor must exit on its own with the retryable code,
within runPolicy.collectiveTimeoutSeconds (plus start-up slack) rather than DeepSpeed's 10 minutes.

The measured seconds are printed (`-s`) for docs/recovery.md.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import psutil
import pytest

from sftjob_api.exit_codes import ExitCode
from sftjob_api.ports import free_port

from .runner import json_events, make_config, trainer_env, write_config
from .tiny import dataset_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

TIMEOUT_S = 20  # runPolicy.collectiveTimeoutSeconds for these runs


def node_cmd(config: str, node_rank: int, port: int) -> list[str]:
    import sys

    return [
        sys.executable,
        "-m",
        "sftjob_trainer",
        "launch",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "train",
        "--config",
        config,
    ]


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


class Node:
    """One 'pod': `python -m sftjob_trainer launch` with its step events collected from stdout."""

    def __init__(self, config: str, node_rank: int, port: int, env: dict[str, str]):
        self.proc = subprocess.Popen(
            node_cmd(config, node_rank, port),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.steps: list[int] = []
        self.stderr: list[str] = []
        self.first_error_at: float | None = None  # monotonic time of the first stderr line naming a timeout
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.steps += [e["step"] for e in json_events(line) if e["event"] == "step"]

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if self.first_error_at is None and ("timed out" in line.lower() or "timeout" in line.lower()):
                self.first_error_at = time.monotonic()

    def signal_tree(self, sig: int) -> None:
        for p in tree(self.proc.pid):
            p.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal_tree(signal.SIGKILL)
            self.signal_tree(signal.SIGCONT)
        self.proc.wait(timeout=30)


@pytest.fixture
def two_nodes(tiny_model_dir, tmp_path):
    data = write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(120, seed=5))
    cfg = make_config(
        tiny_model_dir,
        data,
        str(tmp_path / "out") + "/",
        str(tmp_path / "work"),
        max_steps=400,
        checkpoint_steps=1000,
        global_batch=4,
        micro=2,
        runPolicy={"collectiveTimeoutSeconds": TIMEOUT_S},
    )
    config = write_config(str(tmp_path / "cfg.json"), cfg)
    port = free_port()
    nodes: list[Node] = []

    def start() -> tuple[Node, Node]:
        env = trainer_env()
        nodes.extend([Node(config, 0, port, env), Node(config, 1, port, env)])
        return nodes[0], nodes[1]

    yield start
    for n in nodes:
        n.kill()


def wait_for_step(node: Node, step: int, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if node.steps and node.steps[-1] >= step:
            return
        if node.proc.poll() is not None:
            pytest.fail(f"node exited early with {node.proc.returncode}: {''.join(node.stderr)[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no step {step} within {timeout}s: {''.join(node.stderr)[-3000:]}")


def survivor_exit(survivor: Node, limit: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        rc = survivor.proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"survivor still running {limit}s after its peer vanished (step {survivor.steps[-1:]})")
    if survivor.first_error_at is not None:
        print(f"\nfirst timeout error logged {survivor.first_error_at - t0:.1f}s after the peer vanished")
    return rc, time.monotonic() - t0


def test_frozen_peer_survivor_exits_retryable_within_collective_timeout(two_nodes):
    rank0, rank1 = two_nodes()
    wait_for_step(rank0, 3)
    rank1.signal_tree(signal.SIGSTOP)  # the node is gone but its sockets stay open: no reset ever comes
    rc, seconds = survivor_exit(rank0, TIMEOUT_S * 3 + 60)
    print(
        f"\nfrozen peer: survivor exited rc={rc} after {seconds:.1f}s (collectiveTimeoutSeconds={TIMEOUT_S})"
    )
    assert rc == ExitCode.RETRYABLE, "".join(rank0.stderr)[-3000:]
    assert seconds >= TIMEOUT_S - 2, f"exited after {seconds:.1f}s: before the timeout, so not because of it"
    assert any("timed out" in line.lower() or "timeout" in line.lower() for line in rank0.stderr), "".join(
        rank0.stderr
    )[-3000:]


def test_killed_peer_survivor_exits_retryable_at_once(two_nodes):
    rank0, rank1 = two_nodes()
    wait_for_step(rank0, 3)
    rank1.signal_tree(signal.SIGKILL)  # the pod died: the kernel resets its connections
    rc, seconds = survivor_exit(rank0, TIMEOUT_S * 3 + 60)
    print(
        f"\nkilled peer: survivor exited rc={rc} after {seconds:.1f}s (collectiveTimeoutSeconds={TIMEOUT_S})"
    )
    assert rc == ExitCode.RETRYABLE, "".join(rank0.stderr)[-3000:]
