"""Config -> tokenized train and held-out examples; shared by train and eval."""

from __future__ import annotations

import os
from typing import Any

from sftjob_api.trainer_config import TrainerConfig

from .data import Example, load_dataset, split
from .records import DropReport


def prepare_examples(cfg: TrainerConfig, tok: Any) -> tuple[list[Example], list[Example], DropReport]:
    """(train, eval, report): the same deterministic split on every rank, restart and stage."""
    ds = cfg.dataset
    cache = os.path.join(cfg.runtime.work_dir, "data")
    examples, report = load_dataset(list(ds.train), tok, ds, cache, cfg.output)
    if ds.eval:
        ev, _ = load_dataset(list(ds.eval), tok, ds, cache, cfg.output)
        return examples, ev, report
    train, ev = split(examples, ds.eval_split, cfg.training.seed)
    return train, ev, report
