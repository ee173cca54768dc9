"""An adapter checkpoint written by 2 ranks resumes on 1 and on 3 (real DeepSpeed ZeRO-3 on gloo ranks).

The reference trains one epoch on 2 ranks and checkpoints at step 4; that checkpoint is exactly what a run
stopped after step 4 leaves, so it is copied to two other output roots and resumed there with 1 and 3 ranks
(the global batch of 12 divides by micro 2 x 1, 2 and 3 ranks: accumulation 6, 3, 2).

Tolerance: the resized runs compute the same global batch (the same rows, the same sum of token losses over
the same label count, the same clipping and Adam update) as the reference, split into other micro-batches:
only the order of fp32 additions differs (per micro-batch, per rank, in the all-reduce). Measured here the
losses agree to ~2e-7 relative and the adapters to ~2e-8; rel=1e-4 leaves room for another BLAS's summation
order, while a wrong cursor trains other rows (losses of different batches differ by ~1e-2 here) and a lost
optimizer state or schedule changes every later update.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sftjob_api.ports import free_port

from .runner import json_events, launch_cmd, make_config, trainer_env, write_config
from .tiny import dataset_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

RUN = "elastic"
STOP_AT = 4  # the checkpoint the resized runs start from


def launch(config: str, nproc: int, env: dict[str, str]) -> tuple[int, list[dict], float | None, str]:
    """Run to the end; (exit code, events, seconds from launch to the first step event, stderr tail)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        launch_cmd(config, nproc, free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events: list[dict] = []
    first_step = None
    assert proc.stdout is not None
    for line in proc.stdout:
        events += json_events(line)
        if first_step is None and events and events[-1]["event"] == "step":
            first_step = time.monotonic() - t0
    err = proc.stderr.read() if proc.stderr else ""
    return proc.wait(timeout=600), events, first_step, err[-4000:]


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_two_rank_checkpoint_resumes_on_one_and_three_ranks(tiny_model_dir, tmp_path):
    import torch

    data = write_jsonl(str(tmp_path / "d.jsonl"), dataset_rows(120, seed=11))
    env = trainer_env({"SFTJOB_RUN_ID": RUN, "SFTJOB_TEST_LOG_SAMPLES": "1"})

    def config(name: str) -> str:
        cfg = make_config(
            tiny_model_dir,
            data,
            str(tmp_path / name),
            str(tmp_path / f"work-{name}"),
            checkpoint_steps=STOP_AT,
            global_batch=12,
            micro=2,
            packing=False,  # one sample per row: the count below is per sample
            extra_training={"epochs": 1},
        )
        del cfg["training"]["maxSteps"]
        return write_config(str(tmp_path / f"{name}.json"), cfg)

    rc, ref, _, err = launch(config("ref"), 2, env)
    assert rc == 0, err
    [plan] = [e["plan"] for e in ref if e["event"] == "data"]
    total, train_examples = plan["total_steps"], plan["steps_per_epoch"] * 12
    assert total == plan["steps_per_epoch"] > STOP_AT  # one epoch; the resize happens inside it
    ref_loss = {e["step"]: e["loss"] for e in ref if e["event"] == "step"}

    for world in (1, 3):
        name = f"w{world}"
        src = tmp_path / "ref" / "checkpoints" / RUN / f"step-{STOP_AT}"
        shutil.copytree(src, tmp_path / name / "checkpoints" / RUN / f"step-{STOP_AT}")
        rc, ev, first_step_s, err = launch(config(name), world, env)
        assert rc == 0, err
        assert [e["step"] for e in ev if e["event"] == "resumed"] == [STOP_AT]
        [ds] = [e for e in ev if e["event"] == "deepspeed"]
        assert ds["world_size"] == world
        # every rank read the same world-size-independent state, and the RNG of the rank it stands in for
        fetched = {e["rank"]: e["files"] for e in ev if e["event"] == "checkpoint_fetched"}
        assert fetched == {
            r: sorted(["adapter_state.safetensors", f"rng_rank{r % 2}.json"]) for r in range(world)
        }
        # the next steps' losses match the uninterrupted 2-rank run (tolerance: module docstring)
        got = {e["step"]: e["loss"] for e in ev if e["event"] == "step"}
        assert sorted(got) == list(range(STOP_AT + 1, total + 1))
        for step, loss in got.items():
            assert loss == pytest.approx(ref_loss[step], rel=1e-4), (world, step, loss, ref_loss[step])
        worst = max(abs(loss / ref_loss[step] - 1) for step, loss in got.items())
        # every training sample exactly once in the epoch: steps 1..4 on 2 ranks, the rest on `world`
        before = [e for e in ref if e["event"] == "samples" and e["step"] <= STOP_AT]
        after = [e for e in ev if e["event"] == "samples"]
        assert {e["rank"] for e in after} == set(range(world)) and min(e["step"] for e in after) > STOP_AT
        seen = collections.Counter(i for e in before + after for i in e["ids"])
        assert len(seen) == train_examples and set(seen.values()) == {1}, seen.most_common(3)
        # the final adapter is the reference's up to the same rounding
        a, b = adapter(tmp_path / "ref"), adapter(tmp_path / name)
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6), k
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(
            f"world {world}: launch -> first step {first_step_s:.1f} s; loss rel diff {worst:.1e}; adapter {diff:.1e}"
        )
