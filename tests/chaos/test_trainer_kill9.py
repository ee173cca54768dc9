"""Trainer crashes (issue 14, part 3): SIGKILL of a rank at a random step (seeded), then the same run again.

Every run must resume from its newest complete checkpoint (steps lost <= checkpointSteps), replay the
reference run's losses exactly and end with an adapter identical to the uninterrupted run's (fixed training
seed). A kill while a checkpoint is being uploaded leaves that checkpoint without its COMPLETE marker, and
the resume loads the one before. Real trainer CLI under torchrun, DeepSpeed ZeRO-3 on CPU (gloo), the tiny
Llama, checkpoints in SeaweedFS; helpers from tests/trainer. Figures: docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from typing import Any

import pytest

from sftjob_api.ports import free_port

from .conftest import FULL, count

pytestmark = [
    pytest.mark.trainer,
    pytest.mark.slow,
    pytest.mark.chaos,
    pytest.mark.timeout(7200 if FULL else 1800),
]

MAX_STEPS, CKPT_EVERY = 12, 3
RANKS = int(os.environ.get("SFTJOB_CHAOS_RANKS", "2"))


def trainer_helpers() -> Any:
    from trainer import runner  # tests/trainer/runner.py (tests/ is on sys.path, as for tests/conftest.py)

    return runner


def launch(runner: Any, cfg: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        runner.launch_cmd(cfg, RANKS, free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


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


def keys(s3: Any, prefix: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in resp.get("Contents", []))


def adapter(s3: Any, prefix: str, tmp_path: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    dest = str(tmp_path / (prefix.strip("/") + ".safetensors"))
    s3.client().download_file(s3.bucket, prefix + "adapter/adapter_model.safetensors", dest)
    return load_file(dest)


def same_adapter(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


def crash_and_resume(
    runner: Any,
    s3: Any,
    cfg: str,
    env: dict[str, str],
    prefix: str,
    kill_when: Any,
    hold_marker_at: int | None = None,
) -> dict[str, Any]:
    """Run until `kill_when(event)` says so, SIGKILL a rank, run again; what happened, for the checks.
    `hold_marker_at`: rank 0 waits before that step's COMPLETE marker (docs/trainer.md) and is the one killed."""
    from sftjob_trainer.checkpoint import HOLD_MARKER_ENV

    held = {HOLD_MARKER_ENV: str(hold_marker_at)} if hold_marker_at else {}
    proc = launch(runner, cfg, {**env, **held})
    assert proc.stdout is not None
    last_step, killed_at, partial = 0, None, None
    for line in proc.stdout:
        for ev in runner.json_events(line):
            if ev["event"] == "step":
                last_step = ev["step"]
            if killed_at is None and (why := kill_when(ev)):
                partial = why if isinstance(why, int) else None
                kill_rank(proc.pid, 0 if held else random.Random(last_step).randrange(RANKS))
                killed_at = last_step
    proc.wait(timeout=300)
    after_kill = keys(s3, prefix)
    again = runner.run(runner.launch_cmd(cfg, RANKS, free_port()), env, timeout=1200)
    events = runner.json_events(again.stdout)
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    return {
        "killed_rc": proc.returncode,
        "killed_at": killed_at,
        "last_step_before_death": last_step,
        "partial_checkpoint": partial,
        "partial_left_incomplete": partial is not None
        and f"checkpoints/local/step-{partial}/COMPLETE" not in after_kill
        and any(k.startswith(f"checkpoints/local/step-{partial}/") for k in after_kill),
        "rc": again.returncode,
        "resumed_from": resumed[0] if resumed else 0,
        "steps": [e["step"] for e in events if e["event"] == "step"],
        "losses": [e["loss"] for e in events if e["event"] == "step"],
        "stderr": again.stderr[-2000:],
    }


def test_rank_sigkilled_at_random_steps_resumes_exactly(
    s3: Any, tiny_model_dir: str, tmp_path: Any, report: Any
) -> None:
    runner = trainer_helpers()
    from trainer.tiny import dataset_rows, write_jsonl

    data = write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(120, seed=5))
    env = runner.trainer_env(s3.env())

    def config(name: str) -> str:
        cfg = runner.make_config(
            tiny_model_dir, data, s3.uri(f"{name}/"), str(tmp_path / f"work-{name}"),
            max_steps=MAX_STEPS, checkpoint_steps=CKPT_EVERY, global_batch=8, micro=2,
        )  # fmt: skip
        return runner.write_config(str(tmp_path / f"{name}.json"), cfg)

    ref = runner.run(runner.launch_cmd(config("ref"), RANKS, free_port()), env, timeout=1200)
    assert ref.returncode == 0, ref.stderr[-4000:]
    ref_losses = [e["loss"] for e in runner.json_events(ref.stdout) if e["event"] == "step"]
    ref_adapter = adapter(s3, "ref/", tmp_path)

    runs: list[dict[str, Any]] = []
    n = count(1, 10)
    for i in range(n):
        kill_step = random.Random(1000 + i).randint(1, MAX_STEPS - 1)
        out = crash_and_resume(
            runner,
            s3,
            config(f"r{i}"),
            env,
            f"r{i}/",
            lambda ev, k=kill_step: ev["event"] == "step" and ev["step"] == k,
        )
        out["identical_adapter"] = out["rc"] == 0 and same_adapter(
            ref_adapter, adapter(s3, f"r{i}/", tmp_path)
        )
        runs.append(out)

    # A kill while a checkpoint is being uploaded: some of step-N's files are in S3, COMPLETE is not.
    store = s3.client()

    def uploading(ev: dict[str, Any]) -> int | None:
        if ev["event"] != "step" or ev["step"] % CKPT_EVERY or ev["step"] >= MAX_STEPS:
            return None
        prefix = f"upload/checkpoints/local/step-{ev['step']}/"  # no SFTJOB_RUN_ID: run "local"
        for _ in range(2000):  # the save starts right after the step event; poll the bucket
            found = [
                o["Key"] for o in store.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
            ]
            if any(k.endswith("/COMPLETE") for k in found):
                return None  # too late for this one: try the next checkpoint
            if found:
                return int(ev["step"])
        return None

    mid = crash_and_resume(runner, s3, config("upload"), env, "upload/", uploading, hold_marker_at=CKPT_EVERY)
    mid["identical_adapter"] = mid["rc"] == 0 and same_adapter(ref_adapter, adapter(s3, "upload/", tmp_path))

    figures = {
        "runs": n,
        "ranks": RANKS,
        "max_steps": MAX_STEPS,
        "checkpoint_steps": CKPT_EVERY,
        "killed_at": [r["killed_at"] for r in runs],
        "resumed_from": [r["resumed_from"] for r in runs],
        "steps_lost_max": max(r["last_step_before_death"] - r["resumed_from"] for r in runs),
        "resumed_ok": sum(1 for r in runs if r["rc"] == 0),
        "identical_adapters": sum(1 for r in runs if r["identical_adapter"]),
        "identical_losses": sum(
            1 for r in runs if r["losses"] == pytest.approx(ref_losses[r["resumed_from"] :], rel=1e-6)
        ),
        "mid_upload": {
            k: mid[k]
            for k in ("partial_checkpoint", "partial_left_incomplete", "resumed_from", "identical_adapter")
        },
    }
    report(figures)
    for r in runs:
        assert r["killed_at"] is not None and r["killed_rc"] != 0, r
        assert r["rc"] == 0, r["stderr"]
        assert r["steps"] == list(range(r["resumed_from"] + 1, MAX_STEPS + 1)), r
    assert figures["steps_lost_max"] <= CKPT_EVERY, figures
    assert figures["identical_adapters"] == figures["identical_losses"] == n, figures
    assert mid["partial_checkpoint"] is not None, "no kill landed inside a checkpoint upload"
    assert mid["partial_left_incomplete"] and mid["resumed_from"] < mid["partial_checkpoint"], mid
    assert mid["rc"] == 0 and mid["identical_adapter"], mid
