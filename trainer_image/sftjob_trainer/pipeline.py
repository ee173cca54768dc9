"""Config -> tokenized train and held-out examples; shared by train and eval."""

from __future__ import annotations

import os
from typing import Any

from sftjob_api.trainer_config import TrainerConfig

from .curation import DataReport, Scorer, curate
from .data import Example


def prepare_examples(
    cfg: TrainerConfig, tok: Any, scorer: Scorer | None = None
) -> tuple[list[Example], list[Example], DataReport]:
    """(train, eval, report): the same deterministic curation, split and mixture on every rank, restart and
    stage. `scorer` (the base model's perplexity) is only needed by spec.dataset.curation.perplexity; the eval
    stage passes none (its held-out split is drawn before that filter)."""
    cache = os.path.join(cfg.runtime.work_dir, "data")
    return curate(cfg.dataset, tok, seed=cfg.training.seed, cache_dir=cache, output=cfg.output, scorer=scorer)
