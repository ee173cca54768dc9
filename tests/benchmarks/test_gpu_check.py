"""The GPU check's pure parts (benchmarks/gpu_check_lib.py) and its time-box plumbing; no GPU, no timing.

The whole check in `--cpu-smoke` mode takes several minutes on a 2-core machine, so it is not run here;
`bash benchmarks/gpu_check.sh --cpu-smoke DIR` runs it by hand.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))

import gpu_check  # noqa: E402
import gpu_check_lib as lib  # noqa: E402


def test_rows_are_deterministic_and_length_varied():
    a, b = lib.make_rows(200), lib.make_rows(200)
    assert a == b
    lengths = [len(r["completion"].split()) for r in a]
    assert min(lengths) < 20 < 100 < max(lengths)
    line = json.loads(lib.messages_jsonl(a[:1]))
    assert [m["role"] for m in line["messages"]] == ["user", "assistant"]


def test_budget_boxes_never_exceed_what_is_left():
    b = lib.Budget(total_s=100, reserve_s=10, start=time.monotonic() - 60)
    assert b.box(1000) == pytest.approx(30, abs=1)
    assert b.box(5) == 5
    assert lib.Budget(total_s=10, reserve_s=10).box(50) == 0


@pytest.mark.trainer
def test_trainer_configs_are_valid_for_the_trainer(tmp_path):
    from sftjob_trainer.config import parse_config
    from sftjob_trainer.speed import effective_zero_stage

    kw = dict(
        model_dir=str(tmp_path),
        data=str(tmp_path / "d.jsonl"),
        out_root=str(tmp_path / "o"),
        work_dir=str(tmp_path / "w"),
        steps=4,
        seq=256,
        global_batch=4,
        micro=2,
        lr=1e-3,
    )
    q = parse_config(lib.trainer_config(method="qlora", zero3=True, checkpoint_steps=2, **kw))
    assert q.method.quantization.compute_dtype == "bfloat16"
    ds = q.resources.deepspeed
    # (a) must really run ZeRO-3 on one rank; (b) measures the shipped one-rank default (stage 0)
    assert effective_zero_stage(ds.zero_stage, 1, ds.offload_params, ds.offload_optimizer) == 3
    plain = parse_config(lib.trainer_config(method="lora", **kw)).resources.deepspeed
    assert effective_zero_stage(plain.zero_stage, 1, plain.offload_params, plain.offload_optimizer) == 0


def test_events_throughput_and_checks():
    text = "\n".join(
        [
            "noise",
            json.dumps({"event": "deepspeed", "zero_stage": 3}),
            *[
                json.dumps({"event": "step", "step": i, "loss": 10 - i, "tokens": 1000, "step_seconds": 0.5})
                for i in range(1, 7)
            ],
            '{"event": "step", broken',
        ]
    )
    ev = lib.json_events(text)
    assert lib.first(ev, "deepspeed")["zero_stage"] == 3
    assert lib.throughput(ev, warmup=2) == {
        "timed_steps": 4,
        "tokens": 4000,
        "seconds": 2.0,
        "tokens_per_second": 2000.0,
        "median_step_tokens_per_second": 2000.0,
    }
    losses = lib.step_losses(ev)
    assert lib.loss_decreased(losses)["passed"]
    assert not lib.loss_decreased({1: 5.0, 2: 5.0, 3: 5.0, 4: 5.0})["passed"]
    assert not lib.loss_decreased({1: 5.0})["passed"]
    resumed = {4: 6.0, 5: 5.001, 6: 4.0}
    assert lib.resume_matches(losses, resumed, tol=0.01)["passed"]
    assert not lib.resume_matches(losses, {5: 5.5}, tol=0.01)["passed"]
    assert not lib.resume_matches(losses, {}, tol=0.01)["passed"]


@pytest.mark.trainer
def test_matmul_params_match_a_real_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert lib.llama_matmul_params(cfg.to_dict()) == linear
    assert lib.mfu(1000.0, lib.lora_train_flops_per_token(linear), 1e9) == pytest.approx(4 * linear * 1e-6)
    assert lib.mfu(None, 10, 1e9) is None


def test_markdown_reports_every_part_and_the_failures():
    res = {
        "mode": "gpu",
        "date": "2026-11-30",
        "command": "x",
        "env": {"gpu": "H200"},
        "peak_tflops": 780.0,
        "parts": {
            "a_qlora_zero3": {
                "status": "ok",
                "zero_stage": 3,
                "loss": {"passed": True},
                "resume": {"passed": True},
            },
            "b_throughput": {
                "runs": [
                    {
                        "name": "ours_lora",
                        "impl": "ours",
                        "method": "lora",
                        "status": "ok",
                        "tokens_per_second": 3000.0,
                        "mfu": 0.31,
                        "peak_gpu_mem_bytes": 2**33,
                        "samples_per_step": 64.5,
                        "median_step_tokens_per_second": 3100.0,
                    },
                    {
                        "name": "trl_lora",
                        "impl": "trl",
                        "method": "lora",
                        "status": "ok",
                        "tokens_per_second": 1500.0,
                        "mfu": 0.15,
                    },
                    {
                        "name": "trl_fastest_lora",
                        "impl": "trl_fastest",
                        "method": "lora",
                        "status": "ok",
                        "tokens_per_second": 2000.0,
                    },
                    {"name": "trl_qlora", "impl": "trl", "method": "qlora", "status": "timeout"},
                ]
            },
        },
        "failures": {"b_trl_qlora": "timeout after 100 s\nTraceback", "a2_resume": None},
    }
    md = lib.markdown(res)
    assert "| ours_lora | lora | ok | 64.5 | 3,000 | 3,100 | 31.0% | 8.0 | - | 2.00x | 1.50x |" in md
    assert "| trl_qlora | qlora | timeout | - | - | - | - | - | - | - | - |" in md
    assert "### b_trl_qlora" in md and "a2_resume" not in md
    assert "(c) eval and merge" in md and "not run" in md


def test_a_step_past_its_box_is_killed_with_its_children_and_recorded(tmp_path):
    code = (
        "import subprocess, sys, time; print('started', flush=True); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    with open(tmp_path / "log", "w") as log:
        r = gpu_check.run_step("sleepy", [sys.executable, "-c", code], dict(os.environ), 3, log)
    assert r["timed_out"] and r["stdout"] == "started\n"
    assert gpu_check.status_of(r) == "timeout"
    assert "===== sleepy: rc=" in (tmp_path / "log").read_text()
