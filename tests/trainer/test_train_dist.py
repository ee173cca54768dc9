"""Real training runs: 2-rank torchrun, DeepSpeed ZeRO-3 (gloo), checkpoints in real S3 (SeaweedFS).

Slow by nature (each launch imports torch/transformers/deepspeed in every rank), so runs are shared
within a test where one run can prove several things.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from sftjob_api import Layout
from sftjob_api.manifest import verify_manifest
from sftjob_api.ports import free_port
from sftjob_api.storage import S3Store

from .runner import json_events, launch_cmd, make_config, run, trainer_env, write_config
from .tiny import dataset_rows, write_jsonl

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as when a pod dies (torchrun puts each worker
    in its own session, so a process-group kill would leave them running)."""
    import psutil

    root = psutil.Process(pid)
    children = root.children(recursive=True)
    for p in [root, *children]:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(children, timeout=30)  # not the root: Popen.wait must reap it to see -9


def keys(s3, prefix: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in resp.get("Contents", []))


def adapter_tensors(s3, prefix: str, tmp_path) -> dict:
    from safetensors.torch import load_file

    dest = str(tmp_path / (prefix.replace("/", "_") + ".safetensors"))
    s3.client().download_file(s3.bucket, prefix + "adapter/adapter_model.safetensors", dest)
    return load_file(dest)


@pytest.fixture
def data_file(tmp_path) -> str:
    return write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(120, seed=5))


def losses(events) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "step"]


def test_lora_zero3_two_ranks_resumes_after_kill_9(s3, tiny_model_dir, data_file, tmp_path):
    env = trainer_env(s3.env())

    def config(name: str) -> str:
        cfg = make_config(
            tiny_model_dir,
            data_file,
            s3.uri(f"{name}/"),
            str(tmp_path / f"work-{name}"),
            max_steps=12,
            checkpoint_steps=4,
            global_batch=8,
            micro=2,
        )
        return write_config(str(tmp_path / f"{name}.json"), cfg)

    # 1. uninterrupted reference run
    ref = run(launch_cmd(config("ref"), 2, free_port()), env)
    assert ref.returncode == 0, ref.stderr[-4000:]
    ev = json_events(ref.stdout)
    ls = losses(ev)
    assert len(ls) == 12 and sum(ls[-3:]) / 3 < sum(ls[:3]) / 3, ls
    # built under ZeRO-3 init: before DeepSpeed, rank 0 holds the new adapters and none of the base weights
    [info] = [e for e in ev if e["event"] == "model"]
    assert info["zero3_init"] and info["params_held"] == info["trainable_params"] < info["params"], info
    # data: rank 0 curated and cut one shard per rank (no curate stage without dataset.curation); each rank
    # read its own shard and nothing else
    assert len([e for e in ev if e["event"] == "curating"]) == 1
    shard_reads = {e["rank"]: e["keys"] for e in ev if e["event"] == "data_fetched"}
    assert sorted(shard_reads) == [0, 1] and all(
        len(shard_reads[r]) == 1 and shard_reads[r][0].endswith(f"/rank-{r}.npz") for r in (0, 1)
    ), shard_reads
    ref_keys = keys(s3, "ref/")
    # keepCheckpoints=2: step-4 and step-8 under the run's prefix (no SFTJOB_RUN_ID: "local"), each the
    # world-size-independent adapter state, both ranks' RNG state and the marker: nothing to unpickle
    for step in (4, 8):
        got = sorted(k for k in ref_keys if k.startswith(f"checkpoints/local/step-{step}/"))
        want = ["COMPLETE", "adapter_state.safetensors", "rng_rank0.json", "rng_rank1.json"]
        assert got == [f"checkpoints/local/step-{step}/{f}" for f in want], ref_keys
    assert "adapter/adapter_model.safetensors" in ref_keys and "adapter/adapter_config.json" in ref_keys
    # eval and merge are off: training is the last stage, so it completes the run with a manifest
    ref_store = S3Store(s3.uri("ref/"), s3.client())
    assert verify_manifest(ref_store) == []
    # the summary counts the tokens of both ranks (each step event reports the all-rank count)
    summary = json.loads(ref_store.get_bytes(Layout.TRAIN_SUMMARY))
    assert summary["tokens"] == sum(e["tokens"] for e in ev if e["event"] == "step")
    # adapter checkpoints leave the frozen base out (it is reloaded from model.uri on resume)
    import torch
    from safetensors.torch import load_file

    dest = str(tmp_path / "state.safetensors")
    s3.client().download_file(s3.bucket, "ref/checkpoints/local/step-4/adapter_state.safetensors", dest)
    state = load_file(dest)
    assert state and all("lora_" in k for k in state)
    assert {k.split("/")[0] for k in state} == {"param", "exp_avg", "exp_avg_sq"}

    # 2. same run, killed with SIGKILL (whole process group) right after checkpoint step-4 is complete
    cfg_b = config("crash")
    proc = subprocess.Popen(
        launch_cmd(cfg_b, 2, free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen += json_events(line)
        if seen and seen[-1]["event"] == "checkpoint" and seen[-1]["step"] == 4:
            kill_tree(proc.pid)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    crash_keys = keys(s3, "crash/")
    assert "checkpoints/local/step-4/COMPLETE" in crash_keys
    assert not any(k.startswith("adapter/") for k in crash_keys)
    # a half-written newer checkpoint (no COMPLETE) must be ignored, never loaded
    s3.client().put_object(
        Bucket=s3.bucket,
        Key="crash/checkpoints/local/step-8/adapter_state.safetensors",
        Body=b"garbage",
    )

    # 3. restart: resumes from step-4 and ends exactly where the uninterrupted run ended
    again = run(launch_cmd(cfg_b, 2, free_port()), env)
    assert again.returncode == 0, again.stderr[-4000:]
    ev2 = json_events(again.stdout)
    assert [e["step"] for e in ev2 if e["event"] == "resumed"] == [4]
    # each rank fetched the shared adapter state and its own RNG state, nothing else
    fetched = {e["rank"]: e["files"] for e in ev2 if e["event"] == "checkpoint_fetched"}
    assert fetched == {r: ["adapter_state.safetensors", f"rng_rank{r}.json"] for r in (0, 1)}, fetched
    assert [e["step"] for e in ev2 if e["event"] == "step"] == list(range(5, 13))
    # the restarted group found the shards the first attempt wrote: nobody curated again
    assert not [e for e in ev2 if e["event"] == "curating"]
    assert sorted(e["rank"] for e in ev2 if e["event"] == "data_fetched") == [0, 1]
    assert losses(ev2) == pytest.approx(ls[4:], rel=1e-6)
    a = adapter_tensors(s3, "ref/", tmp_path)
    b = adapter_tensors(s3, "crash/", tmp_path)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # B starts at 0: it trained


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

    out = tmp_path / "out"
    cfg = make_config(
        tiny_model_dir,
        data_file,
        str(out),
        str(tmp_path / "work"),
        method="full",
        max_steps=2,
        checkpoint_steps=1,
    )
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
    # the same run again resumes DeepSpeed's per-rank files at the same size (each rank its own partition,
    # hashes verified) and reproduces step 2 (another size exits 2: recovery.md, "Formats")
    again = run(launch_cmd(write_config(str(tmp_path / "full.json"), cfg), 2, free_port()), trainer_env())
    assert again.returncode == 0, again.stderr[-4000:]
    ev2 = json_events(again.stdout)
    assert [e["step"] for e in ev2 if e["event"] == "resumed"] == [1]
    fetched = {e["rank"]: e["files"] for e in ev2 if e["event"] == "checkpoint_fetched"}
    assert all(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in fetched[r] for r in (0, 1)), fetched
    assert not set(fetched[0]) & {f for f in fetched[1] if "rank" in f}
    assert losses(ev2) == pytest.approx(losses(ev)[1:], rel=1e-6)
