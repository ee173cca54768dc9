"""Per-rank training shards (sftjob_trainer/shards.py, pipeline.prepare_train): a rank's shard holds exactly
the examples the training loop gives that rank, rank 0 writes the shards while the others wait, each rank reads
only its own shard, and another world size gets shards of its own from the same curated entry. Real files,
the real (tiny) tokenizer, two ranks as threads."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from sftjob_api.layout import curated_root
from sftjob_api.storage import open_store
from sftjob_trainer import shards
from sftjob_trainer.config import parse_config
from sftjob_trainer.curation import cache
from sftjob_trainer.packing import epoch_order, micro_batches_for
from sftjob_trainer.pipeline import TrainData, ensure_curated, prepare_train

from .tiny import dataset_rows, write_jsonl

pytestmark = pytest.mark.trainer


def config(tmp_path: Any, model_dir: str, name: str = "a", **training: Any) -> Any:
    out = str(tmp_path / "out")
    return parse_config(
        {
            "run": {"namespace": "ns", "name": name, "outputRoot": f"{out}/ns/{name}"},
            "model": {"uri": model_dir},
            "dataset": {"train": [str(tmp_path / "train.jsonl")], "format": "alpaca", "maxSeqLength": 256},
            "method": {"type": "lora"},
            "training": {"globalBatchSize": 4, "microBatchSize": 1, **training},
            "output": {"uri": out},
            "runtime": {"metricsPort": 0, "workDir": str(tmp_path / "work")},
        }
    )


def loop_reads(order: shards.TrainOrder, lengths: list[int], world: int, seed: int) -> list[set[int]]:
    """What train.py's loop reads, rank by rank, written out step by step as the loop does it."""
    plan = order.plan
    seen: list[set[int]] = [set() for _ in range(world)]
    for step in range(plan.total_steps):
        epoch, within = divmod(step, plan.steps_per_epoch)
        ordered = epoch_order(order.rows, seed, epoch)
        for r in range(world):
            for mb in micro_batches_for(
                r, world, within * plan.rows_per_step, ordered, lengths, plan.micro, plan.accum
            ):
                seen[r].update(i for row in mb for i in row)
    return seen


@pytest.mark.parametrize(("packing", "epochs", "world"), [(True, 1, 2), (False, 1, 4), (True, 2.5, 2)])
def test_a_rank_shard_holds_exactly_what_the_loop_gives_that_rank(
    tmp_path, tiny_model_dir, packing, epochs, world
):
    cfg = config(tmp_path, tiny_model_dir, epochs=epochs)
    cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"packing": packing})})
    lengths = [random.Random(i).randint(8, 200) for i in range(300)]
    order = shards.train_order(lengths, cfg, world)
    got = shards.rank_examples(order, lengths, world, cfg.training.seed)
    assert [set(g) for g in got] == loop_reads(order, lengths, world, cfg.training.seed)
    if epochs == 1:  # one pass: the shards split the data, no example is read by two ranks
        assert sum(len(g) for g in got) == len(set().union(*got))
        assert all(len(g) < len(lengths) / world * 1.5 for g in got), [len(g) for g in got]


def test_ranks_read_only_their_own_shard_that_rank_0_wrote(tmp_path, tiny_model_dir, tiny_tokenizer):
    write_jsonl(str(tmp_path / "train.jsonl"), dataset_rows(80, seed=11))
    cfg = config(tmp_path, tiny_model_dir, epochs=1)
    got: dict[int, TrainData] = {}

    def rank(r: int) -> None:
        got[r] = prepare_train(cfg, tiny_tokenizer, r, 2)

    waiting = threading.Thread(target=rank, args=(1,))
    waiting.start()  # rank 1 first: nothing to read yet, it waits for rank 0
    rank(0)
    waiting.join(timeout=120)
    assert sorted(got) == [0, 1]

    full = ensure_curated(cfg, tiny_tokenizer)  # what rank 0 curated and saved
    layout = shards.layout_id(cfg, 2)
    lengths = [len(e.input_ids) for e in full.train]
    need = shards.rank_examples(shards.train_order(lengths, cfg, 2), lengths, 2, cfg.training.seed)
    for r in (0, 1):
        assert got[r].fetched == [shards.shard_key(full.key, layout, r)]
        assert got[r].lengths == lengths
        assert sorted(got[r].examples) == need[r]
        assert all(got[r].examples[i] == full.train[i] for i in need[r])
        assert got[r].report == full.report and not got[r].reused  # this run curated it
    assert not set(got[0].examples) & set(got[1].examples)

    # another world size: its own shards, cut from the same entry (not curated again); another run reuses
    store = open_store(curated_root(cfg.output.uri, "ns"))
    before = {k: store.get_bytes(k) for k in store.list(full.key) if "/shards/" not in k}
    other = prepare_train(config(tmp_path, tiny_model_dir, name="b", epochs=1), tiny_tokenizer, 0, 4)
    assert other.reused and other.fetched == [shards.shard_key(full.key, shards.layout_id(cfg, 4), 0)]
    assert {k: store.get_bytes(k) for k in store.list(full.key) if "/shards/" not in k} == before
    assert cache.marker(store, full.key)["curated_by"] == "ns/a"
    layouts = {k.split("/")[2] for k in store.list(full.key) if "/shards/" in k}
    assert layouts == {layout, shards.layout_id(cfg, 4)}
