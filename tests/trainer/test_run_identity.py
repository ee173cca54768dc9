"""Checkpoints and run identity (docs/recovery.md): real trainer runs (DeepSpeed, one gloo rank, local store).

One run writes checkpoints; then, on the same output root: a re-created run (another run id) with a changed
learning rate starts fresh and leaves the old run's files as they were, never loading a planted checkpoint
under a third run's prefix; a tampered checkpoint file is refused naming the file; another SFTJob
warm-starts from the first run's adapter through spec.training.resumeFrom, and a resumeFrom that is neither
checkpoint nor adapter fails naming the field. Runs are shared between the asserts: each launch imports torch and DeepSpeed anew. The same run
with an edited spec: tests/pipeline/test_sftjob_run.py (through `sftjob run`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sftjob_api.exit_codes import ExitCode
from sftjob_api.ports import free_port

from .runner import json_events, launch_cmd, make_config, run, trainer_env, write_config
from .tiny import dataset_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_run_identity_integrity_and_warm_start(tiny_model_dir, tmp_path):
    data = write_jsonl(str(tmp_path / "d.jsonl"), dataset_rows(80, seed=3))
    out = tmp_path / "out"

    def launch(name: str, run_id: str, lr: float, out_dir: Path = out, **training):
        cfg = make_config(
            tiny_model_dir,
            data,
            str(out_dir),
            str(tmp_path / f"work-{name}"),
            max_steps=4,
            checkpoint_steps=2,
            lr=lr,
            extra_training=training,
        )
        term = tmp_path / f"{name}.term"
        env = trainer_env({"SFTJOB_RUN_ID": run_id, "SFTJOB_TERMINATION_LOG": str(term)})
        res = run(launch_cmd(write_config(str(tmp_path / f"{name}.json"), cfg), 1, free_port()), env)
        message = term.read_text() if term.exists() else ""
        return res, json_events(res.stdout), message

    def losses(events):
        return [e["loss"] for e in events if e["event"] == "step"]

    # 1. run A: a checkpoint at step 2 that records its run, its spec's fingerprint and every file's sha256
    a, ev_a, _ = launch("a", "run-a", 3e-3)
    assert a.returncode == 0, a.stderr[-3000:]
    ckpt = out / "checkpoints" / "run-a" / "step-2"
    marker = json.loads((ckpt / "COMPLETE").read_text())
    assert marker["run"] == "run-a" and marker["format"] == "adapter" and marker["state"]["step"] == 2
    assert marker["fingerprint"]["spec.training.learningRate"] == 3e-3
    files = digests(ckpt)
    assert marker["files"] == {k: v for k, v in files.items() if k != "COMPLETE"}
    assert set(marker["files"]) == {"adapter_state.safetensors", "rng_rank0.json"}  # nothing to unpickle
    a_files = digests(out / "checkpoints" / "run-a")

    # 2. run B (a re-created SFTJob: another uid) with a changed learning rate, and a third run's planted
    # checkpoint at a higher step: B starts fresh, loads neither, and leaves A's checkpoints as they were
    evil = out / "checkpoints" / "evil" / "step-999"
    evil.mkdir(parents=True)
    (evil / "COMPLETE").write_text(json.dumps({"run": "evil", "format": "adapter", "files": {}}))
    (evil / "adapter_state.safetensors").write_bytes(b"not a checkpoint")
    b, ev_b, _ = launch("b", "run-b", 1e-3)
    assert b.returncode == 0, b.stderr[-3000:]
    assert not [e for e in ev_b if e["event"] in ("resumed", "checkpoint_fetched", "warm_start")], ev_b
    assert [e["step"] for e in ev_b if e["event"] == "step"] == [1, 2, 3, 4]
    [ignored] = [e for e in ev_b if e["event"] == "checkpoints_of_other_runs_ignored"]
    assert ignored["runs"] == ["evil", "run-a"]
    assert digests(out / "checkpoints" / "run-a") == a_files
    assert (out / "checkpoints" / "run-b" / "step-2" / "COMPLETE").exists()
    assert losses(ev_b)[0] == pytest.approx(losses(ev_a)[0], rel=1e-6)  # same start: no old state mixed in

    # 3. run A again, but a checkpoint file was changed after its marker: refused, file named
    state = ckpt / "adapter_state.safetensors"
    body = bytearray(state.read_bytes())
    body[-1] ^= 0xFF
    state.write_bytes(bytes(body))
    tampered, ev_t, message = launch("a-tampered", "run-a", 3e-3)
    assert tampered.returncode == ExitCode.PERMANENT, tampered.stderr[-3000:]
    assert "checkpoints/run-a/step-2/adapter_state.safetensors does not match the sha256" in message, message
    assert not [e for e in ev_t if e["event"] == "step"]

    # 4. another SFTJob (own output root) warm-starts from A's adapter and runs from step 1 with its own
    # schedule: its first batch is B's first batch (same data order), whose loss from the untrained adapter
    # every fresh run reproduces to 1e-6 (A and B above); A's trained adapter lowers it clearly
    c, ev_c, _ = launch("c", "run-c", 3e-3, tmp_path / "out-c", resumeFrom=str(out / "adapter") + "/")
    assert c.returncode == 0, c.stderr[-3000:]
    [warm] = [e for e in ev_c if e["event"] == "warm_start"]
    assert warm["tensors"] > 0
    assert [e["step"] for e in ev_c if e["event"] == "step"] == [1, 2, 3, 4]
    assert losses(ev_c)[0] < losses(ev_b)[0] - 0.02, (losses(ev_c), losses(ev_b))

    # 5. a resumeFrom that is neither a checkpoint nor an adapter: permanent, the field named
    bad, _, message = launch("d", "run-d", 3e-3, tmp_path / "out-d", resumeFrom=str(tmp_path / "nothing"))
    assert bad.returncode == ExitCode.PERMANENT, bad.stderr[-3000:]
    assert "spec.training.resumeFrom" in message and "neither a complete checkpoint" in message, message
