"""Real training runs: 2-rank torchrun, DeepSpeed ZeRO-3 (gloo), checkpoints in real S3 (SeaweedFS).
LoRA's kill-and-resume on 2 ranks: tests/chaos/test_trainer_kill9.py; at another world size:
test_elastic_resume.py.

Slow by nature (each launch imports torch/transformers/deepspeed in every rank), so runs are shared
within a test where one run can prove several things.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sftjob_api.ports import free_port

from .runner import json_events, launch_cmd, make_config, run, trainer_env, write_config
from .tiny import dataset_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def keys(s3, prefix: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in resp.get("Contents", []))


@pytest.fixture
def data_file(tmp_path) -> str:
    return write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(120, seed=5))


def losses(events) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "step"]


def test_qlora_4bit_adamw_8bit_zero3_two_ranks_resumes_on_one_rank(s3, tiny_model_dir, data_file, tmp_path):
    """QLoRA with bitsandbytes' 8-bit AdamW on 2 ZeRO-3 ranks, then its checkpoint of step 3 resumed on 1 rank
    (bnb_state.py: the moments saved dequantized, quantized again into the 1-rank layout on load).

    Tolerance: step 4's loss needs only the weights (fp32 master copies, restored exactly): measured equal.
    Steps 5 and 6 also follow the moments, which the 2-rank run keeps in blocks of 256 elements of its flat
    partitions and the 1-rank run in blocks of each parameter (fp32 where a matrix is under bitsandbytes'
    4096 elements): each moment is rounded once more to the nearest 8-bit code of another block, which moved
    these losses by 6.2e-6 and 7.4e-6 relative; the same resume with the moments lost (zeroed, by hand) moved
    them by 1.5e-3. rel=1e-4 lies between the two (docs/recovery.md, "Measured").
    """

    def qlora_8bit(prefix: str, nproc: int) -> subprocess.CompletedProcess[str]:
        cfg = make_config(
            tiny_model_dir,
            data_file,
            s3.uri(f"{prefix}/"),
            str(tmp_path / f"work-{prefix}"),
            method="qlora",
            max_steps=6,
            checkpoint_steps=3,
            global_batch=8,
            micro=2,
            extra_training={"optimizer": "adamw_8bit"},
        )
        cfg["method"]["lora"]["r"] = 64  # matrices of >= 4096 elements: 8-bit state on 1 rank too
        config = write_config(str(tmp_path / f"{prefix}.json"), cfg)
        return run(launch_cmd(config, nproc, free_port()), trainer_env(s3.env()))

    res = qlora_8bit("q", 2)
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json_events(res.stdout)
    [info] = [e for e in ev if e["event"] == "model"]
    assert info["linear_4bit_layers"] == 2 * 7 and info["trainable_params"] > 0  # q,k,v,o,gate,up,down x 2
    ls = losses(ev)
    assert len(ls) == 6 and ls[-1] < ls[0], ls
    k = keys(s3, "q/")
    assert "checkpoints/local/step-3/COMPLETE" in k and "adapter/adapter_model.safetensors" in k
    # the adapter format, with each rank's raw 8-bit state for a resume at the same size
    assert {"bnb_state_rank0.safetensors", "bnb_state_rank1.safetensors"} <= set(
        keys(s3, "q/checkpoints/local/step-3/")
    )
    client = s3.client()
    for name in keys(s3, "q/checkpoints/local/step-3/"):
        src = {"Bucket": s3.bucket, "Key": f"q/checkpoints/local/step-3/{name}"}
        client.copy_object(CopySource=src, Bucket=s3.bucket, Key=f"q1/checkpoints/local/step-3/{name}")
    one = qlora_8bit("q1", 1)
    assert one.returncode == 0, one.stderr[-4000:]
    ev1 = json_events(one.stdout)
    assert [e["step"] for e in ev1 if e["event"] == "resumed"] == [3]
    fetched = {e["rank"]: e["files"] for e in ev1 if e["event"] == "checkpoint_fetched"}
    assert fetched == {0: ["adapter_state.safetensors", "rng_rank0.json"]}  # no raw state at another size
    got = losses(ev1)
    rel = [abs(a / b - 1) for a, b in zip(got, ls[3:], strict=True)]
    print(f"adamw_8bit 2 -> 1 rank: steps 4-6 loss rel diff {', '.join(f'{r:.1e}' for r in rel)}")
    assert got == pytest.approx(ls[3:], rel=1e-4)


def test_full_zero3_init_two_ranks_checkpoints_and_exports_the_whole_model(
    tiny_model_dir, data_file, tmp_path
):
    """Full fine-tuning with the base built under ZeRO-3 init: no rank ever held the whole model, yet the
    checkpoint and the exported model are complete (gathered), trained, and shaped like the base. Its
    checkpoints then resume at the same size, on 1 rank (2 -> 1), and that 1-rank run's own checkpoint (no
    ZeRO: one model-states file) on 2 ranks again (1 -> 2), each matching the uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    def full_run(out: Path, nproc: int) -> list[dict]:
        cfg = make_config(
            tiny_model_dir,
            data_file,
            str(out),
            str(tmp_path / f"work-{out.name}"),
            method="full",
            max_steps=3,
            checkpoint_steps=1,
        )
        config = write_config(str(tmp_path / f"{out.name}.json"), cfg)
        res = run(launch_cmd(config, nproc, free_port()), trainer_env())
        assert res.returncode == 0, res.stderr[-4000:]
        return json_events(res.stdout)

    def step_dir(out: Path, step: int) -> Path:
        return out / "checkpoints" / "local" / f"step-{step}"

    def model(out: Path) -> dict:
        return load_file(str(out / "model" / "model.safetensors"))

    out = tmp_path / "out"
    ev = full_run(out, 2)
    [info] = [e for e in ev if e["event"] == "model"]
    assert info["zero3_init"] and info["params_held"] == 0 and info["trainable_params"] == info["params"] > 0
    ref_losses = losses(ev)
    assert len(ref_losses) == 3
    # full fine-tuning keeps DeepSpeed's per-rank format; the marker records every file's sha256
    marker = json.loads((step_dir(out, 1) / "COMPLETE").read_text())
    assert marker["format"] == "deepspeed" and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in marker["files"]
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    trained = model(out)
    shared = base.keys() & trained.keys()
    assert len(shared) >= len(base) - 1, (base.keys(), trained.keys())  # a tied lm_head may be saved once
    assert all(trained[k].shape == base[k].shape for k in shared)
    assert any(not torch.equal(trained[k], base[k]) for k in shared)  # it trained, and not into empty shards
    # a copy of the 2-rank checkpoint of step 1, for the resume at another size below
    one = tmp_path / "one"
    shutil.copytree(step_dir(out, 1), step_dir(one, 1))
    # the same run again resumes DeepSpeed's per-rank files at the same size (each rank its own partition,
    # hashes verified) and reproduces step 3
    ev2 = full_run(out, 2)
    assert [e["step"] for e in ev2 if e["event"] == "resumed"] == [2]
    fetched = {e["rank"]: e["files"] for e in ev2 if e["event"] == "checkpoint_fetched"}
    assert all(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in fetched[r] for r in (0, 1)), fetched
    assert not set(fetched[0]) & {f for f in fetched[1] if "rank" in f}
    assert losses(ev2) == pytest.approx(ref_losses[2:], rel=1e-6)
    ref = model(out)

    def resized(ev_new: list[dict], out_new: Path, step: int, sizes: tuple[int, int]) -> None:
        """Resumed from `step` through DeepSpeed's universal checkpoint (recovery.md, "Formats"); the later
        steps match the uninterrupted run. Tolerance: the same global batch of the same rows from the same
        weights and Adam state: only the order of the fp32 additions differs (one rank accumulating both
        halves instead of an all-reduce over two), ~1e-7 relative; 1e-4 still catches weights that were not
        restored (the base's losses are far off). The exported models agree too, which needs the Adam
        moments: a fresh optimizer's first update (lr * sign-like) differs from a bias-corrected later one
        by the order of lr."""
        assert [e["step"] for e in ev_new if e["event"] == "resumed"] == [step]
        [conv] = [e for e in ev_new if e["event"] == "checkpoint_converted"]
        assert (conv["from_world_size"], conv["to_world_size"]) == sizes
        assert losses(ev_new) == pytest.approx(ref_losses[step:], rel=1e-4)
        got = model(out_new)
        diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
        print(f"universal checkpoint {sizes[0]} -> {sizes[1]} rank(s): {conv}; exported model {diff:.2e} off")
        assert diff < 1e-5

    resized(full_run(one, 1), one, 1, (2, 1))
    # that 1-rank run checkpointed step 2 without ZeRO: no partitions, one model-states file; 2 ranks resume it
    marker = json.loads((step_dir(one, 2) / "COMPLETE").read_text())
    assert marker["world_size"] == 1 and sorted(marker["files"]) == [
        "mp_rank_00_model_states.pt",
        "rng_rank0.json",
    ]
    two = tmp_path / "two"
    shutil.copytree(step_dir(one, 2), step_dir(two, 2))
    resized(full_run(two, 2), two, 2, (1, 2))
