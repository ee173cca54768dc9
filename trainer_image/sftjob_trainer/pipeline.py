"""Config -> tokenized train and held-out examples and the data report; shared by train and eval.

Curated once: the result is stored content-addressed beside the runs (curation/cache.py) and reused by the
eval stage, every restart and every rerun of the namespace with the same inputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sftjob_api.layout import curated_root
from sftjob_api.storage import open_store
from sftjob_api.trainer_config import TrainerConfig

from .curation import Scorer, cache, curate
from .data import Example


@dataclass(frozen=True)
class Prepared:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any]  # DataReport.as_dict()
    key: str | None  # the curated data's cache key (None: inputs that could not be fingerprinted)
    reused: bool  # read from the cache rather than curated here


def prepare_examples(
    cfg: TrainerConfig,
    tok: Any,
    scorer: Scorer | None = None,
    *,
    agree: Callable[[bool], bool] = lambda hit: hit,
    save: bool = False,
) -> Prepared:
    """The same deterministic curation, split and mixture on every rank, restart and stage. `scorer` (the base
    model's perplexity) is only needed by spec.dataset.curation.perplexity; the eval stage passes none (its
    held-out split is drawn before that filter, so it must not `save`). `agree(hit)`: whether every rank
    found the cache entry (ranks that score perplexity together must all curate, or none)."""
    store = open_store(curated_root(cfg.output.uri, cfg.run.namespace), cfg.output)
    scored = cfg.dataset.curation is not None and cfg.dataset.curation.perplexity is not None
    model_ref = cfg.base_model_reference() if scored else None
    key = cache.key_for(cfg.dataset, tok, cfg.training.seed, model_ref, cfg.output)
    got = cache.load(store, key) if key else None
    if agree(got is not None) and got is not None:
        return Prepared(got.train, got.eval, got.report, key, True)
    work = os.path.join(cfg.runtime.work_dir, "data")
    train, ev, rep = curate(
        cfg.dataset, tok, seed=cfg.training.seed, cache_dir=work, output=cfg.output, scorer=scorer
    )
    report = rep.as_dict()
    if save and key:
        cache.save(store, key, cache.Curated(train, ev, report))
    return Prepared(train, ev, report, key, False)
