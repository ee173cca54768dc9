"""`sftjob run` stopped by a signal after training, in the phase chosen by the test (Evaluating with SIGINT,
then Merging with SIGTERM): exit 128 + the signal, a message naming what is saved and the command that
resumes, no later phase, no stage process left; the same command skips what completed (training and eval are
not redone) and finishes. Interrupts mid-training: test_sftjob_run.py, test_tracking_mlflow.py."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from sftjob_api.manifest import verify_manifest
from sftjob_api.storage import open_store

from .sftjob_cli import CLI, write_spec
from .test_sftjob_run import spec_doc

TRAINING = {"maxSteps": 4, "globalBatchSize": 4, "microBatchSize": 2, "gradientCheckpointing": False}


def read_until(proc: subprocess.Popen, text: str) -> str:
    """The run's output up to and including the first line holding `text` (the run goes on meanwhile)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the run ended without printing {text!r}:\n" + "".join(seen)[-3000:])


def stage_processes(work: str) -> list[str]:
    """Command lines of processes that run a stage of this run (launch, torchrun, workers, eval, merge)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if os.path.join(work, "config.json") in argv:
            found.append(" ".join(argv))
    return found


def interrupt_in(cmd: list[str], cwd: Path, env: dict[str, str], phase: str, sig: signal.Signals) -> str:
    """Start the run, send `sig` as soon as it prints `phase Phase`; its whole output. It must exit 128 + sig,
    with no phase after that one and no stage process left."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    head = read_until(proc, f"phase {phase}")  # printed just before the stage's process starts
    proc.send_signal(sig)
    log = head + proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + sig, log[-3000:]
    assert "phase" not in log.split(f"phase {phase}", 1)[1].replace(f"in phase {phase}", ""), log[-3000:]
    assert stage_processes(cmd[cmd.index("--work-dir") + 1]) == []  # the stage and all it started are gone
    return log


@pytest.mark.trainer
@pytest.mark.slow
def test_interrupts_after_training_stop_cleanly_and_resume_without_training_again(tiny_model_dir, tmp_path):
    from trainer.tiny import dataset_rows, write_jsonl

    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(40, seed=1))
    write_jsonl(str(tmp_path / "eval.jsonl"), dataset_rows(6, seed=2))
    spec = write_spec(tmp_path / "tiny.yaml", spec_doc(tiny_model_dir, training=TRAINING))
    work = tmp_path / "work"
    cmd = [*CLI, "run", spec, "--work-dir", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = open_store(str(tmp_path / "runs" / "local" / "tiny-run"))
    resume = f"sftjob run {spec} --work-dir {work}"

    # Ctrl-C while evaluating: training is kept, nothing of eval or merge is written
    log = interrupt_in(cmd, tmp_path, env, "Evaluating", signal.SIGINT)
    assert "interrupted by SIGINT in phase Evaluating: the eval stage stopped" in log, log[-3000:]
    assert "saved: completed stage(s) train (skipped when resumed)" in log
    assert f"to resume, run the same command (it runs eval, merge): {resume}" in log
    assert store.exists("train/summary.json") and store.list("adapter")
    assert not store.list("eval") and not store.list("merged") and not store.exists("manifest.json")
    trained = (work / "train.log").read_text()

    # the same command resumes: training skipped; SIGTERM while merging keeps the completed eval
    log = interrupt_in(cmd, tmp_path, env, "Merging", signal.SIGTERM)
    assert "phase Training: already done (train/summary.json present): skipped" in log
    assert "interrupted by SIGTERM in phase Merging: the merge stage stopped" in log, log[-3000:]
    assert "saved: completed stage(s) train, eval (skipped when resumed)" in log
    assert f"to resume, run the same command (it runs merge): {resume}" in log
    assert store.exists("eval/results.json") and not store.exists("manifest.json")
    evaluated = (work / "eval.log").read_text()

    # and again: only the merge runs, the run completes
    last = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "phase Training: already done (train/summary.json present): skipped" in last.stdout
    assert "phase Evaluating: already done (eval/results.json present): skipped" in last.stdout
    assert "phase Merging: " in last.stdout and "phase Succeeded" in last.stdout
    assert (work / "train.log").read_text() == trained and (work / "eval.log").read_text() == evaluated
    assert verify_manifest(store) == []
    assert store.exists("merged/model.safetensors") and store.exists("report/report.md")
