"""Pure parts of the trainer: checkpoint selection, batch planning, LR schedule, exit codes, config
rendering by the operator and parsing by the trainer."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import yaml

from sftjob_api import Layout
from sftjob_api.exit_codes import PERMANENT_CODES, ExitCode, PermanentError
from sftjob_trainer.__main__ import combine_exit_codes, main, unused_optional_packages
from sftjob_trainer.checkpoint import to_delete
from sftjob_trainer.config import load_config, parse_config
from sftjob_trainer.schedule import deepspeed_config, lr_factor, plan_batches


def test_only_complete_checkpoints_of_this_run_count():
    keys = [
        "checkpoints/r1/step-4/a.pt",
        "checkpoints/r1/step-4/COMPLETE",
        "checkpoints/r1/step-12/a.pt",
        "checkpoints/r1/step-8/COMPLETE",
        "checkpoints/r1/step-8/a.pt",
        "checkpoints/r0/step-99/COMPLETE",  # another run (an earlier SFTJob of the same name)
        "adapter/x",
        "checkpoints/r1/step-x/COMPLETE",
        "checkpoints/step-50/COMPLETE",  # no run segment: nobody's
    ]
    assert Layout.scan_checkpoints(keys, "r1") == ([4, 8], [12])
    assert Layout.newest_checkpoint(keys, "r1") == 8  # 12 is newer but half-written; 99 is not ours
    assert Layout.newest_checkpoint(keys, "r2") is None
    assert Layout.checkpoint_runs(keys) == ["r0", "r1"]
    assert Layout.newest_checkpoint(["checkpoints/r1/step-3/a.pt"], "r1") is None
    with pytest.raises(ValueError):
        Layout.checkpoint("../other", 1)  # a run id is never a path


def test_align_checkpoints_are_their_own_prefix():
    """The align stage's checkpoints (align/checkpoints/) and training's never see each other."""
    A = Layout.ALIGN_CHECKPOINTS
    keys = [
        "checkpoints/r1/step-8/COMPLETE",
        f"{A}/r1/step-2/COMPLETE",
        f"{A}/r1/step-4/x",
        f"{A}/r0/step-6/COMPLETE",
    ]
    assert Layout.newest_checkpoint(keys, "r1") == 8
    assert Layout.scan_checkpoints(keys, "r1", A) == ([2], [4])
    assert Layout.checkpoint_runs(keys, A) == ["r0", "r1"] and Layout.checkpoint_runs(keys) == ["r1"]
    assert Layout.checkpoint_marker("r1", 2, A) == f"{A}/r1/step-2/COMPLETE"
    assert to_delete(keys, "r1", keep=1, just_written=6, prefix=A) == [4]  # the stale partial only


def test_retention_keeps_newest_and_drops_stale_partials_of_this_run_only():
    keys = [f"checkpoints/r1/step-{s}/COMPLETE" for s in (2, 4, 6)] + [
        "checkpoints/r1/step-5/x",
        "checkpoints/r1/step-9/x",
        "checkpoints/r0/step-1/COMPLETE",
        "checkpoints/r0/step-3/x",
    ]
    assert to_delete(keys, "r1", keep=2, just_written=6) == [2, 5]
    assert to_delete(keys, "r1", keep=0, just_written=6) == [2, 4, 5]  # keep>=1: never the one just written


def test_gradient_accumulation_is_derived_and_must_divide():
    p = plan_batches(n_rows=100, global_batch=16, micro=2, world=2, epochs=2, max_steps=None)
    assert (p.accum, p.steps_per_epoch, p.total_steps, p.rows_per_step) == (4, 6, 12, 16)
    assert plan_batches(100, 16, 4, 1, None, 5).total_steps == 5
    with pytest.raises(PermanentError, match="not a multiple"):
        plan_batches(100, 16, 3, 2, 1, None)
    with pytest.raises(PermanentError, match="fewer than one global batch") as e:
        plan_batches(10, 16, 2, 2, 1, None)
    # says what to change: more data, a smaller globalBatchSize (a multiple of 4 here), or packing off
    assert "globalBatchSize to at most 10" in str(e.value) and "= 4" in str(e.value)
    assert "dataset.packing: false" in str(e.value) and "add data" in str(e.value)
    with pytest.raises(PermanentError, match=r"lower training\.microBatchSize"):
        plan_batches(1, 16, 2, 2, 1, None)


def test_cosine_schedule_with_warmup():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(f[10:])) and f[-1] < 0.01
    assert lr_factor(50, 100, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(90, 100, 5, "constant_with_warmup") == 1.0


def test_deepspeed_config_shape():
    c = deepspeed_config(
        micro=2,
        accum=4,
        world=2,
        stage=3,
        offload_optimizer="cpu",
        offload_params="none",
        bf16=True,
        fp16=False,
        grad_clip=1.0,
    )
    assert c["train_batch_size"] == 16 and c["gradient_accumulation_steps"] == 4
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in c["zero_optimization"]


def test_exit_code_contract():
    assert ExitCode.PERMANENT == 2 and ExitCode.OK == 0
    assert set(PERMANENT_CODES) == {ExitCode.PERMANENT, ExitCode.EVAL_GATE_FAILED, ExitCode.SPEC_CHANGED}
    # torchrun reports any worker failure as 1; the launcher restores the worker's code
    assert combine_exit_codes(1, [0, 2]) == ExitCode.PERMANENT
    assert combine_exit_codes(1, [4, 1]) == ExitCode.SPEC_CHANGED  # torchrun's own code says 1
    assert combine_exit_codes(0, [0, 0]) == ExitCode.OK
    assert combine_exit_codes(1, [143, 143]) == ExitCode.PREEMPTED
    assert combine_exit_codes(-15, []) == ExitCode.PREEMPTED
    assert combine_exit_codes(1, [1]) == ExitCode.RETRYABLE
    assert combine_exit_codes(2, []) == ExitCode.RETRYABLE  # a launcher's own 2 is not our permanent 2


SPEC = {
    "model": {"uri": "s3://models/llama"},
    "dataset": {"train": ["s3://data/train.jsonl"], "format": "messages"},
    "method": {"type": "lora", "lora": {"r": 8}},
    "training": {"maxSteps": 10, "globalBatchSize": 8, "microBatchSize": 2},
    "output": {"uri": "s3://out/runs"},
}


def test_operator_rendered_config_is_a_valid_trainer_config(tmp_path):
    from sftjob_api import parse_spec
    from sftjob_operator.render.trainer_config import render_trainer_config

    rendered = render_trainer_config("team-a", "run-1", parse_spec(SPEC))
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(rendered))
    cfg = load_config(str(p))
    assert cfg.run.output_root == "s3://out/runs/team-a/run-1/"
    assert cfg.method.type == "lora" and cfg.method.lora.r == 8 and cfg.training.max_steps == 10
    assert cfg.dataset.format == "messages"


def test_a_run_starts_without_the_optional_packages_it_does_not_use():
    def unused(**over: object) -> list[str]:
        return unused_optional_packages(parse_config({"run": {"outputRoot": "/tmp/x"}, **SPEC, **over}))

    assert unused() == ["bitsandbytes", "mlflow"]
    assert unused(method={"type": "qlora"}) == ["mlflow"]  # 4-bit weights are bitsandbytes'
    assert unused(training={**SPEC["training"], "optimizer": "adamw_8bit"}) == ["mlflow"]
    tracked = {"mlflow": {"trackingUri": "http://127.0.0.1:5000", "experiment": "x"}}
    assert unused(tracking=tracked) == ["bitsandbytes"]
    assert unused(tracking={}) == ["bitsandbytes", "mlflow"]


def test_bad_config_names_the_field(tmp_path, monkeypatch):
    bad = {"run": {"outputRoot": "/tmp/x"}, **SPEC, "training": {"microBatchSize": 0}}
    with pytest.raises(PermanentError, match=r"training\.microBatchSize"):
        parse_config(bad)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(bad))
    assert main(["train", "--config", str(p)]) == ExitCode.PERMANENT
    monkeypatch.delenv("SFTJOB_CONFIG", raising=False)
    assert main(["train"]) == ExitCode.PERMANENT


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sftjob_trainer.config, sftjob_trainer.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
