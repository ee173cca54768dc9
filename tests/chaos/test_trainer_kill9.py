"""Trainer crashes (issue 14, part 3): SIGKILL of a rank at a random step (seeded), then the same run again.

Every run must resume from its newest complete checkpoint (steps lost <= checkpointSteps), ignore a newer
one without its marker, replay the reference run's losses exactly and end with an adapter identical to the
uninterrupted run's (fixed training seed; the suite's shared 2-rank reference, tests/trainer/reference.py).
The restarted group reads the data the first attempt curated and the world-size-independent adapter state
(nothing to unpickle), and the finished run's files in S3 verify against its manifest. A kill while a
checkpoint is being uploaded leaves that checkpoint without its COMPLETE marker, and the resume loads the one
before. Real trainer CLI under torchrun, DeepSpeed ZeRO-3 on CPU (gloo), the tiny Llama, checkpoints in
SeaweedFS; helpers from tests/trainer. Figures: docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import subprocess
from typing import Any

import pytest
from trainer.runner import kill_rank

from sftjob_api.ports import free_port

from .conftest import FULL, count

pytestmark = [
    pytest.mark.trainer,
    pytest.mark.slow,
    pytest.mark.chaos,
    pytest.mark.timeout(7200 if FULL else 1800),
]

CKPT_EVERY = 3
RANKS = 2  # the shared reference's


def trainer_helpers() -> Any:
    from trainer import runner  # tests/trainer/runner.py (tests/ is on sys.path, as for tests/conftest.py)

    return runner


def reference_helpers() -> Any:
    from trainer import reference

    return reference


MAX_STEPS = reference_helpers().MAX_STEPS
GARBAGE_STEP = MAX_STEPS + CKPT_EVERY  # a newer checkpoint than any, half-written: no COMPLETE marker


def launch(runner: Any, cfg: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        runner.launch_cmd(cfg, RANKS, free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


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
    first: list[dict[str, Any]] = []
    for line in proc.stdout:
        for ev in runner.json_events(line):
            first.append(ev)
            if ev["event"] == "step":
                last_step = ev["step"]
            if killed_at is None and (why := kill_when(ev)):
                partial = why if isinstance(why, int) else None
                kill_rank(proc.pid, 0 if held else random.Random(last_step).randrange(RANKS))
                killed_at = last_step
    proc.wait(timeout=300)
    after_kill = keys(s3, prefix)
    s3.client().put_object(
        Bucket=s3.bucket,
        Key=f"{prefix}checkpoints/local/step-{GARBAGE_STEP}/adapter_state.safetensors",
        Body=b"x",
    )
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
        "first_attempt": first,
        "events": events,
        "steps": [e["step"] for e in events if e["event"] == "step"],
        "losses": [e["loss"] for e in events if e["event"] == "step"],
        "stderr": again.stderr[-2000:],
    }


def test_rank_sigkilled_at_random_steps_resumes_exactly(
    s3: Any, tiny_model_dir: str, tmp_path: Any, report: Any, two_rank_reference: Any
) -> None:
    runner, reference = trainer_helpers(), reference_helpers()
    data = reference.data_file(tmp_path)
    env = runner.trainer_env(s3.env())

    def config(name: str) -> str:
        cfg = reference.config(
            tiny_model_dir,
            data,
            s3.uri(f"{name}/"),
            str(tmp_path / f"work-{name}"),
            checkpoint_steps=CKPT_EVERY,
        )
        return runner.write_config(str(tmp_path / f"{name}.json"), cfg)

    ref_losses = two_rank_reference.losses
    ref_adapter = two_rank_reference.adapter()

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
    finished_run_is_whole(s3, "r0/", runs[0], two_rank_reference, tmp_path)


def finished_run_is_whole(s3: Any, prefix: str, r: dict[str, Any], ref: Any, tmp_path: Any) -> None:
    """What one crashed-and-resumed run left: data curated once and read per rank, adapter checkpoints, a
    manifest that verifies, the token count of the whole run."""
    from safetensors.torch import load_file

    from sftjob_api import Layout
    from sftjob_api.manifest import verify_manifest
    from sftjob_api.storage import S3Store

    # built under ZeRO-3 init: before DeepSpeed, rank 0 holds the new adapters and none of the base weights
    [info] = [e for e in r["events"] if e["event"] == "model"]
    assert info["zero3_init"] and info["params_held"] == info["trainable_params"] < info["params"], info
    # rank 0 of the first attempt curated and cut one shard per rank (no curate stage without
    # dataset.curation); the restarted group read those shards, one each, and curated nothing
    assert len([e for e in r["first_attempt"] if e["event"] == "curating"]) == 1
    assert not [e for e in r["events"] if e["event"] == "curating"]
    shard_reads = {e["rank"]: e["keys"] for e in r["events"] if e["event"] == "data_fetched"}
    assert sorted(shard_reads) == [0, 1] and all(
        len(shard_reads[k]) == 1 and shard_reads[k][0].endswith(f"/rank-{k}.npz") for k in (0, 1)
    ), shard_reads
    # each rank fetched the shared adapter state and its own RNG state, nothing else
    fetched = {e["rank"]: e["files"] for e in r["events"] if e["event"] == "checkpoint_fetched"}
    assert fetched == {k: ["adapter_state.safetensors", f"rng_rank{k}.json"] for k in (0, 1)}, fetched
    # keepCheckpoints=2, under the run's prefix (no SFTJOB_RUN_ID: "local"): the world-size-independent
    # adapter state, both ranks' RNG state and the marker
    stored = keys(s3, prefix)
    markers = [k for k in stored if k.startswith("checkpoints/local/") and k.endswith("/COMPLETE")]
    complete = sorted(int(k.split("/")[2].removeprefix("step-")) for k in markers)
    assert len(complete) == 2 and complete[-1] > r["resumed_from"], stored
    for step in complete:
        got = sorted(k for k in stored if k.startswith(f"checkpoints/local/step-{step}/"))
        want = ["COMPLETE", "adapter_state.safetensors", "rng_rank0.json", "rng_rank1.json"]
        assert got == [f"checkpoints/local/step-{step}/{f}" for f in want], stored
    dest = str(tmp_path / "state.safetensors")
    s3.client().download_file(
        s3.bucket, f"{prefix}checkpoints/local/step-{complete[-1]}/adapter_state.safetensors", dest
    )
    state = load_file(dest)  # the frozen base stays out (reloaded from model.uri on resume)
    assert state and all("lora_" in k for k in state)
    assert {k.split("/")[0] for k in state} == {"param", "exp_avg", "exp_avg_sq"}
    # training is the last stage (eval and merge off): it completes the run with a manifest that verifies,
    # and its summary counts every step's tokens, those before the crash included (restored state)
    store = S3Store(s3.uri(prefix), s3.client())
    assert verify_manifest(store) == []
    summary = json.loads(store.get_bytes(Layout.TRAIN_SUMMARY))
    assert summary["tokens"] == sum(e["tokens"] for e in ref.events if e["event"] == "step")
