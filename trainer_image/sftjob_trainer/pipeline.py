"""Config -> curated data, computed once per set of inputs and read by every stage that needs it.

The curate stage (or, without one, rank 0 of the train stage) curates, stores the result content-addressed
beside the runs (curation/cache.py) and cuts it into per-rank training shards (shards.py). Training ranks read
only their own shard; the eval stage reads only the held-out part; restarts and reruns with the same inputs
read what is there."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sftjob_api.exit_codes import StorageError
from sftjob_api.layout import curated_root
from sftjob_api.storage import Store, open_store
from sftjob_api.trainer_config import TrainerConfig

from . import shards
from .curation import Scorer, cache, curate
from .data import Example
from .metrics import log_json


@dataclass(frozen=True)
class Prepared:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any]  # DataReport.as_dict()
    key: str | None  # the curated data's cache key (None: inputs that could not be fingerprinted)
    reused: bool  # curated by another run (read from the cache), not by this one


@dataclass(frozen=True)
class TrainData:
    lengths: list[int]  # every training example's token count (the batch order needs them all)
    examples: Mapping[int, Example]  # the examples this rank trains on, by index into the training set
    report: dict[str, Any]
    key: str | None
    reused: bool
    fetched: list[str]  # what this rank read from the curated store


def run_id(cfg: TrainerConfig) -> str:
    return f"{cfg.run.namespace}/{cfg.run.name}"


def curated_store(cfg: TrainerConfig) -> Store:
    return open_store(curated_root(cfg.output.uri, cfg.run.namespace), cfg.output)


def scores_perplexity(cfg: TrainerConfig) -> bool:
    return cfg.dataset.curation is not None and cfg.dataset.curation.perplexity is not None


def cache_key(cfg: TrainerConfig, tok: Any) -> str | None:
    model_ref = cfg.base_model_reference() if scores_perplexity(cfg) else None
    return cache.key_for(cfg.dataset, tok, cfg.training.seed, model_ref, cfg.output)


def base_model_scorer(cfg: TrainerConfig) -> Scorer:
    """The perplexity scorer on a copy of the base model of its own (on a GPU when there is one): curation
    happens before any training model exists, and the training model may be ZeRO-3 partitioned."""
    import torch

    from .curation.perplexity import make_scorer
    from .model import load_base, model_dir, weights_dtype

    on_gpu = torch.cuda.is_available()
    model = load_base(
        model_dir(cfg), cfg.method, weights_dtype(cfg.method, on_gpu), cfg.model.trust_remote_code
    )
    if on_gpu and cfg.method.type != "qlora":  # a 4-bit model is placed on the GPU when it is loaded
        model = model.to("cuda")
    return make_scorer(model)


def _curate(
    cfg: TrainerConfig, tok: Any, scorer: Scorer | None
) -> tuple[list[Example], list[Example], dict[str, Any]]:
    work = os.path.join(cfg.runtime.work_dir, "data")
    train, ev, rep = curate(
        cfg.dataset, tok, seed=cfg.training.seed, cache_dir=work, output=cfg.output, scorer=scorer
    )
    return train, ev, rep.as_dict()


def ensure_curated(cfg: TrainerConfig, tok: Any) -> Prepared:
    """The curated data: read from the cache, or curated here (scoring with the base model when the
    perplexity filter is on) and saved for every later reader."""
    store, key = curated_store(cfg), cache_key(cfg, tok)
    got = cache.load(store, key) if key else None
    if got is not None:
        return Prepared(got.train, got.eval, got.report, key, got.curated_by != run_id(cfg))
    train, ev, report = _curate(cfg, tok, base_model_scorer(cfg) if scores_perplexity(cfg) else None)
    if key:
        cache.save(store, key, cache.Curated(train, ev, report, run_id(cfg)))
    return Prepared(train, ev, report, key, False)


def ensure_shards(cfg: TrainerConfig, tok: Any, world: int) -> tuple[Prepared, str | None]:
    """The curate stage: the curated data and this run's training shards (layout id; None without a key)."""
    data = ensure_curated(cfg, tok)
    if data.key is None:
        return data, None
    layout = shards.layout_id(cfg, world)
    store = curated_store(cfg)
    if not store.exists(shards.done_key(data.key, layout)):
        shards.write(store, data.key, layout, data.train, cfg, world)
    return data, layout


def prepare_train(cfg: TrainerConfig, tok: Any, rank: int, world: int) -> TrainData:
    """This rank's training data. Read from its shard; when there is none yet (no curate stage, or its output
    was deleted), rank 0 curates and writes the shards while the other ranks wait for them."""
    store, key = curated_store(cfg), cache_key(cfg, tok)
    if key is None:  # inputs that cannot be fingerprinted: every rank curates, as without a cache
        train, _, report = _curate(cfg, tok, base_model_scorer(cfg) if scores_perplexity(cfg) else None)
        return TrainData([len(e.input_ids) for e in train], dict(enumerate(train)), report, None, False, [])
    layout = shards.layout_id(cfg, world)
    shard = shards.load(store, key, layout, rank)
    if shard is None and rank == 0:
        log_json("curating", key=key, layout=layout, reason="no shards for this run yet")
        ensure_shards(cfg, tok, world)
        shard = shards.load(store, key, layout, rank)
    elif shard is None:
        shard = shards.wait(store, key, layout, rank)
    if shard is None:
        raise StorageError(f"the training shards {key}/shards/{layout} were written but cannot be read")
    done = cache.marker(store, key) or {}
    report = cache.load_report(store, key)
    return TrainData(
        shard.lengths, shard.examples, report, key, done.get("curated_by") != run_id(cfg), shard.fetched
    )


def prepare_eval(cfg: TrainerConfig, tok: Any) -> Prepared:
    """The held-out examples (and report) for the eval stage: read from the cache, or curated again without
    saving (the held-out split is drawn before the perplexity filter, so no scorer is needed)."""
    store, key = curated_store(cfg), cache_key(cfg, tok)
    got = cache.load(store, key, parts=("eval",)) if key else None
    if got is not None:
        return Prepared([], got.eval, got.report, key, got.curated_by != run_id(cfg))
    train, ev, report = _curate(cfg, tok, None)
    return Prepared(train, ev, report, key, False)
