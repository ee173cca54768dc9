"""Checkpoints under `<output_root>/checkpoints/step-N/` with a COMPLETE marker written last.

Protocol (every rank takes part):
  1. each rank: DeepSpeed save_checkpoint into its own local staging dir, plus its RNG state;
  2. each rank uploads what it wrote to checkpoints/step-N/ (rank files never collide);
  3. barrier; rank 0 writes checkpoints/step-N/COMPLETE (JSON: step, world size, trainer state); barrier;
  4. rank 0 deletes the oldest complete checkpoints beyond `keep`, and incomplete ones older than N.
Resume only ever considers steps whose COMPLETE exists, so a crash mid-upload is ignored. On resume each
rank fetches only the files it reads (`needed_by`): its own ZeRO partition and RNG state, and the files
no rank owns; with ZeRO-3 that is ~1/world of the checkpoint per rank instead of all of it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sftjob_api.exit_codes import PermanentError
from sftjob_api.layout import Layout
from sftjob_api.storage import Store


def to_delete(keys: Iterable[str], keep: int, just_written: int) -> list[int]:
    """Old complete checkpoints beyond `keep` (never the one just written), and stale incomplete ones."""
    done, partial = Layout.scan_checkpoints(keys)
    old = [s for s in done if s != just_written][: max(0, len(done) - max(keep, 1))]
    return old + [s for s in partial if s < just_written]


# files owned by one data-parallel rank: DeepSpeed's ZeRO partitions (model and optimizer states,
# `bf16_` prefixed in bf16 mode) and our RNG state; `mp_rank_00` is the model-parallel rank, shared here
_RANK_OWNED = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_|^rng_state_rank(\d+)\.pt$")


def needed_by(name: str, rank: int) -> bool:
    """Whether `rank` reads this checkpoint file (a name relative to checkpoints/step-N/) on resume: those it
    owns and those no rank owns (e.g. mp_rank_00_model_states.pt below ZeRO-3), never the marker (already
    read) nor another rank's partition (DeepSpeed reads only its own without elastic checkpoints)."""
    m = _RANK_OWNED.match(name)
    owner = None if m is None else int(m.group(1) or m.group(2))
    return name != Layout.CHECKPOINT_MARKER and owner in (None, rank)


def files_for_rank(names: Iterable[str], rank: int) -> list[str]:
    """The files of one checkpoint listing that `rank` needs on resume (`needed_by`)."""
    return sorted(n for n in names if needed_by(n, rank))


def read_marker(store: Store, step: int) -> dict[str, Any]:
    return dict(json.loads(store.get_bytes(Layout.checkpoint_marker(step))))


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# Test-only (docs/trainer.md): rank 0 waits (at most 10 min) before step N's COMPLETE marker, every rank's
# files uploaded, so a test SIGKILLs it inside a checkpoint upload however fast the upload is.
HOLD_MARKER_ENV = "SFTJOB_TEST_HOLD_BEFORE_MARKER"


def hold_before_marker(step: int, limit_s: float = 600) -> None:
    if os.environ.get(HOLD_MARKER_ENV) == str(step):
        time.sleep(limit_s)


def save(
    engine: Any,
    store: Store,
    step: int,
    rank: int,
    staging: str,
    trainer_state: dict[str, Any],
    keep: int,
    save_frozen: bool = True,
) -> None:
    tag = f"step-{step}"
    local = os.path.join(staging, f"rank{rank}")
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local, exist_ok=True)
    engine.save_checkpoint(local, tag=tag, exclude_frozen_parameters=not save_frozen)
    torch.save(rng_state(), os.path.join(local, tag, f"rng_state_rank{rank}.pt"))
    store.upload_dir(os.path.join(local, tag), Layout.checkpoint(step))
    shutil.rmtree(local, ignore_errors=True)
    dist.barrier()
    if rank == 0:
        hold_before_marker(step)
        marker = {"step": step, "world_size": dist.get_world_size(), "trainer_state": trainer_state}
        store.put_bytes(json.dumps(marker, indent=1).encode(), Layout.checkpoint_marker(step))
        for old in to_delete(store.list(Layout.CHECKPOINTS), keep, step):
            store.delete_prefix(Layout.checkpoint(old))
    dist.barrier()


def load(
    engine: Any, store: Store, step: int, rank: int, staging: str, frozen_saved: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """Restore model/optimizer/scheduler (DeepSpeed), this rank's RNG; return the trainer state and the files
    this rank fetched."""
    marker = read_marker(store, step)
    if marker["world_size"] != dist.get_world_size():
        raise PermanentError(
            f"checkpoint step-{step} was written by {marker['world_size']} ranks, this run "
            f"has {dist.get_world_size()}: ZeRO-3 shards cannot be re-partitioned here"
        )
    tag = f"step-{step}"
    local = os.path.join(staging, f"resume-rank{rank}")
    shutil.rmtree(local, ignore_errors=True)
    # the store's own transfer (S3: parallel ranged GETs), restricted to this rank's files
    fetched = sorted(
        store.download_dir(
            Layout.checkpoint(step), os.path.join(local, tag), keep=lambda n: needed_by(n, rank)
        )
    )
    path, _ = engine.load_checkpoint(
        local,
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=frozen_saved,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint step-{step}")
    rng_file = os.path.join(local, tag, f"rng_state_rank{rank}.pt")
    set_rng_state(torch.load(rng_file, weights_only=False))
    shutil.rmtree(local, ignore_errors=True)
    return dict(marker["trainer_state"]), fetched
