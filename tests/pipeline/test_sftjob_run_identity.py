"""`sftjob run` keeps its run's identity in the work directory (docs/recovery.md, "Checkpoints and run
identity"): a run stopped mid-training and rerun from an edited manifest is refused, naming the changed field,
instead of continuing the old optimizer state under the new learning rate; rerun as written it resumes;
`--fresh` starts a new run. Real trainer (DeepSpeed, one gloo rank), local output directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .sftjob_cli import CLI, write_spec
from .test_sftjob_run import sigint_after_step, spec_doc

TRAINING = {
    "maxSteps": 6,
    "learningRate": 3e-3,
    "globalBatchSize": 4,
    "microBatchSize": 2,
    "gradientCheckpointing": False,
    "checkpointSteps": 2,
}
OFF = {"eval": {"enabled": False}, "merge": {"enabled": False}}


@pytest.mark.trainer
@pytest.mark.slow
def test_edited_manifest_is_refused_naming_the_field_and_fresh_starts_a_new_run(tiny_model_dir, tmp_path):
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(40, seed=4))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(6, seed=5))
    spec = tmp_path / "tiny.yaml"
    work = tmp_path / "work"
    cmd = [*CLI, "run", str(spec), "--work-dir", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    checkpoints = tmp_path / "runs" / "local" / "tiny-run" / "checkpoints"

    def sftjob_run(*extra: str, lr: float = 3e-3) -> subprocess.CompletedProcess[str]:
        write_spec(spec, spec_doc(tiny_model_dir, training={**TRAINING, "learningRate": lr}, **OFF))
        return subprocess.run(
            [*cmd, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )

    write_spec(spec, spec_doc(tiny_model_dir, training=TRAINING, **OFF))
    sigint_after_step(cmd, tmp_path, env, work)  # stopped mid-training, a checkpoint kept
    run_id = (work / "run-id").read_text().strip()
    assert [p.name for p in checkpoints.iterdir()] == [run_id]
    saved = sorted(p.parent.name for p in (checkpoints / run_id).glob("step-*/COMPLETE"))
    assert saved, list((checkpoints / run_id).rglob("*"))

    edited = sftjob_run(lr=1e-3)
    assert edited.returncode != 0, edited.stdout[-3000:]
    out = edited.stdout + edited.stderr
    assert "phase Failed: SpecChanged (exit code 4)" in out, out[-3000:]  # the train row's reason for 4
    assert "spec.training.learningRate: 0.003 -> 0.001" in out, out[-3000:]

    again = sftjob_run()  # as written: the same run continues from its checkpoint
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resuming from step {saved[-1].removeprefix('step-')}" in again.stdout, again.stdout[-3000:]

    fresh = sftjob_run("--fresh", lr=1e-3)  # a new run: a new id, trained from step 1 under the new spec
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-3000:]
    assert (work / "run-id").read_text().strip() != run_id
    assert "resuming from step" not in fresh.stdout, fresh.stdout[-3000:]
    assert Path(tmp_path / "runs" / "local" / "tiny-run" / "adapter" / "adapter_config.json").exists()
