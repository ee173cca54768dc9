"""Which run a checkpoint belongs to, and whether this spec may continue it (pure; torch-free).

A checkpoint's COMPLETE marker records the run id (the SFTJob's uid, or `sftjob run`'s own) and the spec's
fingerprint: the values that decide what is trained (model, data content, method, hyper-parameters). The run's
checkpoints live under `checkpoints/<run>/`, so a re-created SFTJob (another uid) never sees them; the same run
with another fingerprint (an edited spec) is refused with the fields that changed, never silently mixed.
Fields that only change how the same computation is laid out (microBatchSize, checkpointSteps, gradient
checkpointing, the number of ranks) are not in the fingerprint: a resume may change them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from sftjob_api.exit_codes import PermanentError, SpecChanged
from sftjob_api.layout import RUN_ID
from sftjob_api.trainer_config import DEFAULT_RUN_ID, RUN_ID_ENV, TrainerConfig

# training.* fields that do not change the computation (camelCase, as in the spec)
LAYOUT_ONLY = (
    "microBatchSize",
    "checkpointSteps",
    "gradientCheckpointing",
    "checkpointingPolicy",
    "resumeFrom",
)


def run_id_from_env(environ: Mapping[str, str] = os.environ) -> str:
    run_id = environ.get(RUN_ID_ENV) or DEFAULT_RUN_ID
    if not RUN_ID.match(run_id):
        raise PermanentError(f"{RUN_ID_ENV}={run_id!r} is not a run id (expected {RUN_ID.pattern})")
    return run_id


def fingerprint(cfg: TrainerConfig, data_key: str) -> dict[str, Any]:
    """The training-relevant spec, by its spec path. `data_key` identifies the data's content (the curated
    data's cache key, which hashes every input file; or a hash of the examples themselves)."""
    training = cfg.training.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {
        "spec.model.uri": cfg.base_model_reference(),
        "spec.model.revision": cfg.model.revision,
        "spec.model.tokenizer": cfg.model.tokenizer,
        "spec.dataset (content)": data_key,
        "spec.dataset.packing": cfg.dataset.packing,
        "spec.dataset.maxSeqLength": cfg.dataset.max_seq_length,
        "spec.method": cfg.method.model_dump(mode="json", by_alias=True, exclude_none=True),
        **{f"spec.training.{k}": v for k, v in sorted(training.items()) if k not in LAYOUT_ONLY},
    }


def digest(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`path: old -> new` for every field that differs."""
    return [
        f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def check_marker(marker: Mapping[str, Any], run_id: str, fields: Mapping[str, Any], where: str) -> None:
    """Raise unless the checkpoint at `where` was written by this run under this spec."""
    if marker.get("run") != run_id:
        raise PermanentError(
            f"{where} records run {marker.get('run')!r}, not this run ({run_id}): a checkpoint under this run's"
            " prefix that another run wrote is never loaded; delete it, or name it in spec.training.resumeFrom"
        )
    old = marker.get("fingerprint") or {}
    if marker.get("fingerprint_sha256") != digest(fields):
        diff = changed(old, fields) or ["(fingerprint mismatch)"]
        raise SpecChanged(
            f"the spec changed since this run wrote {where}: {'; '.join(diff)}. Resuming would continue the old"
            " optimizer state under the new spec. Restore the old values to resume; or start over as a new run"
            " (a new SFTJob; `sftjob run --fresh`), optionally warm-started with spec.training.resumeFrom"
            " set to this checkpoint"
        )
