"""Per-rank shards of the curated training data: each rank reads the examples it trains on, nothing more.

The training order is fixed before the first step: rows packed from the examples' lengths (packing.pack_rows),
a seeded order per epoch (epoch_order), each step's rows split over the ranks (micro_batches_for). So which
examples rank r will ever read follows from the lengths and the config alone, and whoever curated writes
`<key>/shards/<layout>/rank-<r>.npz` beside the curated entry (curation/cache.py): that rank's examples with
their global indices, plus every example's length (the order needs them all; 8 bytes each), then `COMPLETE`.
`<layout>` hashes what decides the order (world size, batch geometry, epochs, max steps, packing, max sequence
length, seed, and the code that orders), so another world or batch size gets its own shards of the same entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sftjob_api.exit_codes import StorageError
from sftjob_api.storage import Store
from sftjob_api.trainer_config import TrainerConfig

from .curation.cache import decode, encode
from .data import Example
from .packing import Row, epoch_order, micro_batches_for, pack_rows, single_rows
from .schedule import BatchPlan, plan_batches

_HERE = Path(__file__).resolve().parent
_ORDER_CODE = [_HERE / "packing.py", _HERE / "schedule.py", Path(__file__).resolve()]
DONE = "COMPLETE"


@dataclass(frozen=True)
class TrainOrder:
    rows: list[Row]  # packed rows of example indices
    plan: BatchPlan


@dataclass(frozen=True)
class Shard:
    lengths: list[int]  # every training example's token count
    examples: Mapping[int, Example]  # this rank's examples, by index into the whole training set
    fetched: list[str]  # the store keys read


def train_order(lengths: Sequence[int], cfg: TrainerConfig, world: int) -> TrainOrder:
    """Rows and batch plan of a run: the same on every rank, restart and stage."""
    t, ds = cfg.training, cfg.dataset
    rows = pack_rows(lengths, ds.max_seq_length) if ds.packing else single_rows(len(lengths))
    plan = plan_batches(len(rows), t.global_batch_size, t.micro_batch_size, world, t.epochs, t.max_steps)
    return TrainOrder(rows, plan)


def rank_examples(order: TrainOrder, lengths: Sequence[int], world: int, seed: int) -> list[list[int]]:
    """For every rank, the sorted indices of the examples it reads in the whole run (a resumed run reads a
    subset). Mirrors the loop in train.py: step -> (epoch, step within the epoch) -> this rank's rows."""
    plan = order.plan
    needed: list[set[int]] = [set() for _ in range(world)]
    for epoch in range(math.ceil(plan.total_steps / plan.steps_per_epoch)):
        ordered = epoch_order(order.rows, seed, epoch)
        for within in range(min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)):
            for rank in range(world):
                start = within * plan.rows_per_step
                for mb in micro_batches_for(rank, world, start, ordered, lengths, plan.micro, plan.accum):
                    for row in mb:
                        needed[rank].update(row)
    return [sorted(s) for s in needed]


def layout_id(cfg: TrainerConfig, world: int) -> str:
    t, ds = cfg.training, cfg.dataset
    decides = {
        "world": world,
        "global": t.global_batch_size,
        "micro": t.micro_batch_size,
        "epochs": t.epochs,
        "max_steps": t.max_steps,
        "packing": ds.packing,
        "max_seq_length": ds.max_seq_length,
        "seed": t.seed,
    }
    h = hashlib.sha256(json.dumps(decides, sort_keys=True).encode())
    for p in _ORDER_CODE:
        h.update(p.read_bytes())
    return f"w{world}-{h.hexdigest()[:16]}"


def shard_key(key: str, layout: str, rank: int) -> str:
    return f"{key}/shards/{layout}/rank-{rank}.npz"


def done_key(key: str, layout: str) -> str:
    return f"{key}/shards/{layout}/{DONE}"


def write(
    store: Store, key: str, layout: str, examples: Sequence[Example], cfg: TrainerConfig, world: int
) -> None:
    """Every rank's shard, COMPLETE last. Raises StorageError (retryable): the ranks wait for these files."""
    lengths = [len(e.input_ids) for e in examples]
    order = train_order(lengths, cfg, world)
    all_lengths = np.array(lengths, dtype=np.int64)
    try:
        for rank, idx in enumerate(rank_examples(order, lengths, world, cfg.training.seed)):
            body = encode(
                [examples[i] for i in idx], index=np.array(idx, dtype=np.int64), all_lengths=all_lengths
            )
            store.put_bytes(body, shard_key(key, layout, rank))
        store.put_bytes(
            json.dumps({"world": world, "examples": len(examples)}).encode(), done_key(key, layout)
        )
    except Exception as e:
        raise StorageError(f"cannot write the training shards {key}/shards/{layout}: {e}") from e


def load(store: Store, key: str, layout: str, rank: int) -> Shard | None:
    """This rank's shard, or None while the shards are not all written."""
    if not store.exists(done_key(key, layout)):
        return None
    name = shard_key(key, layout, rank)
    try:
        examples, arrays = decode(store.get_bytes(name))
    except Exception as e:
        raise StorageError(f"cannot read the training shard {name}: {e}") from e
    index = arrays["index"].tolist()
    return Shard(arrays["all_lengths"].tolist(), dict(zip(index, examples, strict=True)), [name])


def wait(store: Store, key: str, layout: str, rank: int, poll_s: float = 2.0) -> Shard:
    """Poll until rank 0 has written the shards. No deadline of its own: if rank 0 fails, its group fails
    with it (torchrun stops the node's workers; the operator restarts the whole group)."""
    while (got := load(store, key, layout, rank)) is None:
        time.sleep(poll_s)
    return got
