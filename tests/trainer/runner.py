"""Helpers to write a trainer config and run the real CLI (under torchrun for several ranks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Any


def make_config(
    model_dir: str,
    data: str,
    output_root: str,
    work_dir: str,
    *,
    method: str = "lora",
    max_steps: int = 8,
    checkpoint_steps: int = 4,
    global_batch: int = 8,
    micro: int = 2,
    packing: bool = True,
    lr: float = 3e-3,
    extra_training: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run": {"namespace": "test", "name": "tiny", "outputRoot": output_root},
        "model": {"uri": model_dir},
        "dataset": {
            "train": [data],
            "format": "alpaca",
            "evalSplit": 0.1,
            "maxSeqLength": 96,
            "packing": packing,
        },
        "method": {"type": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {
            "maxSteps": max_steps,
            "learningRate": lr,
            "warmupRatio": 0.1,
            "globalBatchSize": global_batch,
            "microBatchSize": micro,
            "gradientCheckpointing": False,
            "seed": 7,
            "checkpointSteps": checkpoint_steps,
            **(extra_training or {}),
        },
        "output": {"uri": output_root, "keepCheckpoints": 2},
        "eval": {"enabled": False},
        "merge": {"enabled": False},
        "runtime": {"metricsPort": 0, "workDir": work_dir},
    }
    cfg.update(sections)
    return cfg


def write_config(path: str, cfg: dict[str, Any]) -> str:
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }
    env.pop("SFTJOB_CONFIG", None)
    return env


def launch_cmd(
    config: str, nproc: int, port: int, nnodes: int = 1, node_rank: int = 0, stage: str = "train"
) -> list[str]:
    """One node's `launch` (torchrun) of a group stage; several nodes on loopback share `port` (node 0
    hosts the store)."""
    return [
        sys.executable,
        "-m",
        "sftjob_trainer",
        "launch",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        stage,
        "--config",
        config,
    ]


def run(cmd: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def json_events(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("{") and '"event"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def kill_rank(launcher_pid: int, rank: int) -> None:
    """SIGKILL the worker process of one rank (found by its RANK environment variable), nothing else."""
    import psutil

    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "LOCAL_RANK" in p.environ():
                p.send_signal(signal.SIGKILL)
                return
        except psutil.Error:
            continue
    raise AssertionError(f"no worker process of rank {rank} under {launcher_pid}")
