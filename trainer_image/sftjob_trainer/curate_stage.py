"""The curate stage (`python -m sftjob_trainer curate`): runs before training when spec.dataset.curation is set,
in one process with no GPU (one when the perplexity filter scores with the base model).

It reads every source, curates (duplicates, near-duplicates, decontamination, filters, gates, mixture),
tokenizes once, stores the result where every later stage and rerun finds it (curation/cache.py), cuts the
training part into one shard per rank of this run (shards.py), and writes train/data_report.json. A data gate
that fails, or a bad input file, fails here with a permanent error naming it, before any GPU is held.
"""

from __future__ import annotations

import json
import os
import time

from sftjob_api import Layout
from sftjob_api.exit_codes import ExitCode
from sftjob_api.storage import open_store
from sftjob_api.trainer_config import TrainerConfig

from .metrics import log_json
from .model import config_tokenizer, model_dir
from .pipeline import ensure_shards
from .tracking import termination_message


def main(cfg: TrainerConfig) -> int:
    t0 = time.monotonic()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = config_tokenizer(cfg, model_dir(cfg))
    world = cfg.world_size()
    data, layout = ensure_shards(cfg, tok, world)
    report = data.report
    open_store(cfg.run.output_root, cfg.output).put_bytes(
        json.dumps(report, indent=1).encode(), Layout.DATA_REPORT
    )
    summary = {
        "curated_key": data.key,
        "reused": data.reused,
        "shards": layout,
        "world_size": world,
        "train_examples": report.get("train_examples"),
        "eval_examples": report.get("eval_examples"),
        "content_hash": report.get("content_hash"),
        "dropped": report.get("dropped"),
        "seconds": round(time.monotonic() - t0, 1),
    }
    log_json("curated", report=report, **summary)
    termination_message(cfg, None, curation=summary)
    return int(ExitCode.OK)
