"""Real training runs: 2-rank torchrun, DeepSpeed ZeRO-3 (gloo), checkpoints in real S3 (SeaweedFS).
LoRA's kill-and-resume on 2 ranks: tests/chaos/test_trainer_kill9.py; at another world size:
test_elastic_resume.py.

Slow by nature (each launch imports torch/transformers/deepspeed in every rank), so runs are shared
within a test where one run can prove several things.
"""

from __future__ import annotations

import json
import shutil
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


def test_qlora_4bit_zero3_two_ranks(s3, tiny_model_dir, data_file, tmp_path):
    cfg = make_config(
        tiny_model_dir,
        data_file,
        s3.uri("q/"),
        str(tmp_path / "work"),
        method="qlora",
        max_steps=6,
        checkpoint_steps=3,
        global_batch=8,
        micro=2,
    )
    res = run(launch_cmd(write_config(str(tmp_path / "q.json"), cfg), 2, free_port()), trainer_env(s3.env()))
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json_events(res.stdout)
    [info] = [e for e in ev if e["event"] == "model"]
    assert info["linear_4bit_layers"] == 2 * 7 and info["trainable_params"] > 0  # q,k,v,o,gate,up,down x 2
    ls = losses(ev)
    assert len(ls) == 6 and ls[-1] < ls[0], ls
    k = keys(s3, "q/")
    assert "checkpoints/local/step-3/COMPLETE" in k and "adapter/adapter_model.safetensors" in k


def test_full_zero3_init_two_ranks_checkpoints_and_exports_the_whole_model(
    tiny_model_dir, data_file, tmp_path
):
    """Full fine-tuning with the base built under ZeRO-3 init: no rank ever held the whole model, yet the
    checkpoint and the exported model are complete (gathered), trained, and shaped like the base."""
    import torch
    from safetensors.torch import load_file

    def full_config(out: Path, work: str) -> dict:
        return make_config(
            tiny_model_dir,
            data_file,
            str(out),
            str(tmp_path / work),
            method="full",
            max_steps=2,
            checkpoint_steps=1,
        )

    out = tmp_path / "out"
    cfg = full_config(out, "work")
    res = run(launch_cmd(write_config(str(tmp_path / "full.json"), cfg), 2, free_port()), trainer_env())
    assert res.returncode == 0, res.stderr[-4000:]
    ev = json_events(res.stdout)
    [info] = [e for e in ev if e["event"] == "model"]
    assert info["zero3_init"] and info["params_held"] == 0 and info["trainable_params"] == info["params"] > 0
    assert len(losses(ev)) == 2
    # full fine-tuning keeps DeepSpeed's per-rank format; the marker records every file's sha256
    marker = json.loads((out / "checkpoints" / "local" / "step-1" / "COMPLETE").read_text())
    assert marker["format"] == "deepspeed" and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in marker["files"]
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    trained = load_file(str(out / "model" / "model.safetensors"))
    shared = base.keys() & trained.keys()
    assert len(shared) >= len(base) - 1, (base.keys(), trained.keys())  # a tied lm_head may be saved once
    assert all(trained[k].shape == base[k].shape for k in shared)
    assert any(not torch.equal(trained[k], base[k]) for k in shared)  # it trained, and not into empty shards
    # a copy of the 2-rank checkpoint of step 1, for the resume at another size below
    other = tmp_path / "one-rank"
    shutil.copytree(out / "checkpoints" / "local" / "step-1", other / "checkpoints" / "local" / "step-1")
    # the same run again resumes DeepSpeed's per-rank files at the same size (each rank its own partition,
    # hashes verified) and reproduces step 2
    again = run(launch_cmd(write_config(str(tmp_path / "full.json"), cfg), 2, free_port()), trainer_env())
    assert again.returncode == 0, again.stderr[-4000:]
    ev2 = json_events(again.stdout)
    assert [e["step"] for e in ev2 if e["event"] == "resumed"] == [1]
    fetched = {e["rank"]: e["files"] for e in ev2 if e["event"] == "checkpoint_fetched"}
    assert all(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in fetched[r] for r in (0, 1)), fetched
    assert not set(fetched[0]) & {f for f in fetched[1] if "rank" in f}
    assert losses(ev2) == pytest.approx(losses(ev)[1:], rel=1e-6)
    # one rank resumes the 2-rank checkpoint through DeepSpeed's universal checkpoint (recovery.md, "Formats")
    cfg1 = full_config(other, "work1")
    one = run(launch_cmd(write_config(str(tmp_path / "one.json"), cfg1), 1, free_port()), trainer_env())
    assert one.returncode == 0, one.stderr[-4000:]
    ev1 = json_events(one.stdout)
    assert [e["step"] for e in ev1 if e["event"] == "resumed"] == [1]
    [conv] = [e for e in ev1 if e["event"] == "checkpoint_converted"]
    assert (conv["from_world_size"], conv["to_world_size"]) == (2, 1)
    print(f"universal conversion 2 -> 1 rank: {conv}")
    # the same global batch of the same rows from the same weights and Adam state: only the order of the fp32
    # additions differs (one rank accumulating both halves instead of an all-reduce over two), ~1e-7
    # relative; 1e-4 still catches weights that were not restored (the base's step-2 loss is far off)
    assert losses(ev1) == pytest.approx(losses(ev)[1:], rel=1e-4)
    # step 2's update needs the Adam moments too: the exported models agree (a fresh optimizer's first
    # update, lr * sign-like, differs from the bias-corrected second one by the order of lr)
    ref, got = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(other / "model" / "model.safetensors")),
    )
    diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    print(f"exported model after the resized step 2: max abs diff {diff:.2e} from the 2-rank run's")
    assert diff < 1e-5
