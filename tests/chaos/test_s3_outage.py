"""S3 outage (issue 14, part 4): SeaweedFS stopped for 30 s (a) while a checkpoint is saved, (b) while the
final adapter is uploaded, (c) while the merged model is uploaded, then started again on the same data.

Each stage must either ride the outage out (boto3 retries with backoff) and exit 0, or exit with a
retryable code and succeed when run again (as the Job would run it); no checkpoint may carry COMPLETE without its files,
and the manifest (written last) must verify at the end. Real trainer CLI (1 rank under torchrun, then the
merge stage), the tiny Llama, a SeaweedFS server of this test's own. Figures: docs/reliability.md.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sftjob_api.exit_codes import PERMANENT_CODES
from sftjob_api.ports import free_port

from .conftest import FULL

pytestmark = [
    pytest.mark.trainer,
    pytest.mark.slow,
    pytest.mark.chaos,
    pytest.mark.timeout(3600 if FULL else 1800),
]

DOWN_S = 30.0
Trigger = Callable[[dict[str, Any]], bool]


def pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_with_outages(
    cmd: list[str], env: dict[str, str], server: Any, triggers: dict[str, Trigger], runner: Any, log: Path
) -> dict[str, Any]:
    """Run `cmd`, stopping S3 for DOWN_S when a trainer event matches a pending trigger (each fires once);
    after a retryable exit code, run it again (as the Job would), at most 3 times."""
    pending, fired, codes = dict(triggers), [], []
    for _ in range(3):
        with log.open("a") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=pump, args=(proc.stdout, lines))
        reader.start()
        while (line := lines.get()) is not None:
            for ev in runner.json_events(line):
                for name in [n for n, trig in pending.items() if trig(ev)]:
                    del pending[name]
                    t0 = time.monotonic()
                    server.stop()  # in this (main) thread: the restarted server must outlive helper threads
                    time.sleep(DOWN_S)
                    server.start()
                    fired.append({"scenario": name, "at": ev, "outage_s": round(time.monotonic() - t0, 1)})
        proc.wait(timeout=600)
        reader.join()
        codes.append(proc.returncode)
        if proc.returncode == 0 or proc.returncode in PERMANENT_CODES:
            break  # done, or failed for good (the Job would not retry either)
    return {"exit_codes": codes, "outages": fired, "not_fired": sorted(pending)}


def checkpoints_sound(s3: Any, prefix: str) -> list[str]:
    """Checkpoints marked COMPLETE that lack a rank file (resume would load a partial checkpoint)."""
    resp = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "checkpoints/")
    keys = {o["Key"][len(prefix) :] for o in resp.get("Contents", [])}
    bad = []
    for marker in (k for k in keys if k.endswith("/COMPLETE")):
        step = marker.rsplit("/", 1)[0]
        # an adapter run's checkpoint: the world-size-independent state and the one rank's RNG
        bad += [
            f"{step}/{f}"
            for f in ("rng_rank0.json", "adapter_state.safetensors")
            if f"{step}/{f}" not in keys
        ]
    return bad


def test_s3_away_30s_at_checkpoint_adapter_and_merge_uploads(
    tiny_model_dir: str, tmp_path: Path, report: Any
) -> None:
    from testbed.seaweed import SeaweedServer
    from trainer import runner
    from trainer.tiny import dataset_rows, write_jsonl

    from sftjob_api.manifest import verify_manifest
    from sftjob_api.storage import S3Store

    server = SeaweedServer(tmp_path / "seaweedfs", tmp_path / "logs").start()
    try:
        s3 = server.new_bucket()
        data = write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(80, seed=3))
        cfg = runner.make_config(
            tiny_model_dir, data, s3.uri("run/"), str(tmp_path / "work"), max_steps=6, checkpoint_steps=3,
            global_batch=8, micro=2, merge={"enabled": True, "dtype": "float32"},
        )  # fmt: skip
        path = runner.write_config(str(tmp_path / "cfg.json"), cfg)
        env = runner.trainer_env(s3.env())
        log = tmp_path / "trainer-stderr.log"
        train = run_with_outages(
            runner.launch_cmd(path, 1, free_port()),
            env,
            server,
            {
                "checkpoint save": lambda ev: ev["event"] == "step" and ev["step"] == 3,
                "final adapter upload": lambda ev: ev["event"] == "step" and ev["step"] == 6,
            },
            runner,
            log,
        )
        sound_after_train = checkpoints_sound(s3, "run/")
        merge = run_with_outages(
            [sys.executable, "-m", "sftjob_trainer", "merge", "--config", path],
            env,
            server,
            {"merge upload": lambda ev: ev["event"] == "merge_verified"},
            runner,
            log,
        )
        try:
            problems = verify_manifest(S3Store(s3.uri("run/"), s3.client()))
        except Exception as e:  # e.g. no manifest at all: a figure, then a failure below
            problems = [f"{type(e).__name__}: {e}"]
    finally:
        server.stop()
    figures = {
        "outage_s": DOWN_S,
        "train": train,
        "merge": merge,
        "complete_checkpoints_missing_files": sound_after_train,
        "manifest_problems": problems,
    }
    report(figures)
    tail = log.read_text(errors="replace")[-3000:]
    for stage in (train, merge):
        assert stage["not_fired"] == [], figures
        assert stage["exit_codes"][-1] == 0, (figures, tail)
    assert sound_after_train == [] and problems == [], figures
