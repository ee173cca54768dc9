"""The align stage (DPO) on 2 ranks under torchrun, DeepSpeed ZeRO-3 on gloo, LoRA, the tiny Llama: the
reference is the SFT policy, and a rank SIGKILLed mid-run resumes bit-exactly like training.

The SFT result is the suite's shared 2-rank reference run (tests/trainer/reference.py): its adapter/ is
copied into each output root, as the train stage leaves it. One uninterrupted run; one run whose rank 1 is
SIGKILLed after step 3 (checkpoint at step 2), then started again: it must resume from step 2, read the
reference log-probabilities back instead of recomputing them, and replay the uninterrupted run's losses and
final aligned adapter exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sftjob_api.ports import free_port

from . import reference
from .runner import json_events, launch_cmd, run, trainer_env, write_config
from .tiny import preference_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

STEPS, CKPT, KILL_AFTER = 6, 2, 3


def align_config(tmp_path: Path, model_dir: str, sft: Path, name: str) -> str:
    out = tmp_path / name
    shutil.copytree(sft / "adapter", out / "adapter")
    cfg = reference.config(model_dir, reference.data_file(tmp_path), str(out), str(tmp_path / f"work-{name}"))
    cfg["alignment"] = {
        "loss": "sigmoid",
        "beta": 0.5,
        "dataset": {
            "train": [write_jsonl(str(tmp_path / "pairs.jsonl"), preference_rows(24, seed=3))],
            "eval": [write_jsonl(str(tmp_path / "held.jsonl"), preference_rows(6, seed=4))],
        },
        "training": {
            "maxSteps": STEPS,
            "globalBatchSize": 4,
            "microBatchSize": 1,
            "checkpointSteps": CKPT,
            "learningRate": 5e-3,
            "warmupRatio": 0.0,
        },
    }
    return write_config(str(tmp_path / f"{name}.json"), cfg)


def kill_rank(launcher_pid: int, rank: int) -> None:
    import psutil

    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "LOCAL_RANK" in p.environ():
                p.send_signal(signal.SIGKILL)
                return
        except psutil.Error:
            continue
    raise AssertionError(f"no worker process of rank {rank} under {launcher_pid}")


def aligned(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "aligned" / "adapter_model.safetensors"))


def sft_policy_logps(cfg_path: str, model_dir: str, sft: Path) -> list[list[float]]:
    """The SFT model's summed log-probabilities of the held-out pairs, computed here without DeepSpeed."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftjob_trainer.config import load_config
    from sftjob_trainer.dpo import PolicyLogps, collate_pairs, load_pairs, pair_logps

    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = load_pairs(load_config(cfg_path), tok).eval
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(sft / "adapter")).eval()
    with torch.no_grad():
        c, r, _, _ = pair_logps(PolicyLogps(model).eval(), collate_pairs(pairs, tok.pad_token_id))
    return [[a, b] for a, b in zip(c.tolist(), r.tolist(), strict=True)]


def test_align_reference_is_the_sft_policy_and_a_kill9_resumes_bit_exactly(
    tiny_model_dir, tmp_path, two_rank_reference
):
    import torch

    sft = two_rank_reference.output
    env = trainer_env()

    # the uninterrupted run
    cfg_a = align_config(tmp_path, tiny_model_dir, sft, "a")
    res = run(launch_cmd(cfg_a, 2, free_port(), stage="align"), env)
    assert res.returncode == 0, res.stderr[-4000:]
    ev_a = json_events(res.stdout)
    steps_a = [e for e in ev_a if e["event"] == "step"]
    assert [e["step"] for e in steps_a] == list(range(1, STEPS + 1))
    [warm] = [e for e in ev_a if e["event"] == "policy_from_sft"]
    assert warm["tensors"] > 0
    # step 1 runs the initial policy, which is the reference: every reward is 0, the loss log(2)
    first = steps_a[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert first["logps_chosen"] == pytest.approx(first["ref_logps_chosen"], abs=1e-4)
    assert steps_a[-1]["loss"] < first["loss"] and steps_a[-1]["reward_margin"] > 0
    # the stored reference is the SFT model's own scoring of the pairs (no DeepSpeed, no second copy)
    out_a = tmp_path / "a"
    stored = json.loads((out_a / "align" / "reference_logps.json").read_text())
    expect = sft_policy_logps(cfg_a, tiny_model_dir, sft)
    assert len(stored["train"]) >= 20 and len(stored["eval"]) == len(expect) >= 5
    assert torch.allclose(torch.tensor(stored["eval"]), torch.tensor(expect), atol=1e-4), (stored, expect)
    summary = json.loads((out_a / "align" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["final"]["reward_margin"] == pytest.approx(steps_a[-1]["reward_margin"], abs=1e-5)
    assert (out_a / "align" / "checkpoints" / "local" / f"step-{CKPT}" / "COMPLETE").exists()
    assert not (out_a / "checkpoints").exists()  # the train stage's prefix is untouched

    # SIGKILL of rank 1 after step KILL_AFTER (it holds there until the kill), then the same run again
    cfg_b = align_config(tmp_path, tiny_model_dir, sft, "b")
    proc = subprocess.Popen(
        launch_cmd(cfg_b, 2, free_port(), stage="align"),
        env={**env, "SFTJOB_TEST_HOLD_AFTER_STEP": str(KILL_AFTER)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if any(e["event"] == "step" and e["step"] == KILL_AFTER for e in json_events(line)):
            kill_rank(proc.pid, 1)
    assert proc.wait(timeout=300) != 0
    again = run(launch_cmd(cfg_b, 2, free_port(), stage="align"), env)
    assert again.returncode == 0, again.stderr[-4000:]
    ev_b = json_events(again.stdout)
    assert [e["step"] for e in ev_b if e["event"] == "resumed"] == [CKPT]
    assert [e["reused"] for e in ev_b if e["event"] == "reference_logps"] == [True]
    assert not [e for e in ev_b if e["event"] == "policy_from_sft"]  # the checkpoint's weights, not SFT's
    assert [e["loss"] for e in ev_b if e["event"] == "step"] == [e["loss"] for e in steps_a[CKPT:]]
    a, b = aligned(out_a), aligned(tmp_path / "b")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
