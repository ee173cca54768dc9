"""The spec fingerprint a checkpoint is bound to (sftjob_trainer.run_identity; pure, torch-free)."""

from __future__ import annotations

from typing import Any

import pytest

from sftjob_api.exit_codes import ExitCode, PermanentError, SpecChanged
from sftjob_api.trainer_config import TrainerConfig
from sftjob_trainer.run_identity import check_marker, digest, fingerprint, run_id_from_env


def config(**training: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "run": {"outputRoot": "/tmp/out/"},
            "model": {"uri": "/models/tiny"},
            "dataset": {"train": ["/data/train.jsonl"]},
            "method": {"type": "lora"},
            "training": {"maxSteps": 8, "learningRate": 3e-3, **training},
            "output": {"uri": "/tmp/out"},
        }
    )


def marker(cfg: TrainerConfig, run: str = "uid-1", data: str = "key-1") -> dict[str, Any]:
    fields = fingerprint(cfg, data)
    return {"run": run, "fingerprint": fields, "fingerprint_sha256": digest(fields)}


def test_layout_only_fields_do_not_change_the_fingerprint():
    base = fingerprint(config(), "k")
    for layout in (
        {"microBatchSize": 2, "globalBatchSize": 16},
        {"checkpointSteps": 7},
        {"resumeFrom": "/x/"},
    ):
        layout.setdefault("globalBatchSize", 16)
        assert digest(fingerprint(config(**layout), "k")) == digest(
            fingerprint(config(globalBatchSize=16), "k")
        )
    assert digest(base) != digest(fingerprint(config(), "other data"))
    assert digest(base) != digest(fingerprint(config(globalBatchSize=32), "k"))


def test_an_edited_spec_on_the_same_run_names_each_changed_field():
    m = marker(config())
    check_marker(m, "uid-1", fingerprint(config(), "key-1"), "checkpoints/uid-1/step-4")  # same: fine
    with pytest.raises(SpecChanged) as e:
        check_marker(
            m, "uid-1", fingerprint(config(learningRate=1e-3, seed=3), "key-1"), "checkpoints/uid-1/step-4"
        )
    msg = str(e.value)
    assert "spec.training.learningRate: 0.003 -> 0.001" in msg and "spec.training.seed: 42 -> 3" in msg
    assert "checkpoints/uid-1/step-4" in msg and e.value.exit_code == ExitCode.SPEC_CHANGED
    with pytest.raises(SpecChanged, match=r"spec.dataset \(content\)"):
        check_marker(m, "uid-1", fingerprint(config(), "key-2"), "c")


def test_a_marker_of_another_run_is_refused():
    with pytest.raises(PermanentError, match="records run 'uid-0', not this run"):
        check_marker(marker(config(), run="uid-0"), "uid-1", fingerprint(config(), "key-1"), "c")


def test_run_id_comes_from_the_environment_and_is_never_a_path():
    assert run_id_from_env({"SFTJOB_RUN_ID": "0c5e7f3a-1b2c-4d5e-8f90-123456789abc"}).startswith("0c5e")
    assert run_id_from_env({}) == "local"
    for bad in ("../x", "a/b", "-x", "x" * 65):
        with pytest.raises(PermanentError, match="SFTJOB_RUN_ID"):
            run_id_from_env({"SFTJOB_RUN_ID": bad})


def test_sftjob_run_keeps_its_run_id_in_the_work_directory(tmp_path):
    from sftjob_operator.local.runner import local_run_id

    first = local_run_id(str(tmp_path))
    assert local_run_id(str(tmp_path)) == first  # a rerun continues the same run (and its checkpoints)
    (tmp_path / "run-id").write_text("../../elsewhere\n")  # never a path: replaced by a fresh id
    fresh = local_run_id(str(tmp_path))
    assert fresh != first and "/" not in fresh
    (tmp_path / "other").mkdir()
    assert local_run_id(str(tmp_path / "other")) != fresh  # another work directory (or --fresh): a new run
