"""The artifact layout of one run: every key, written down once (the stages: stage_table.py).

Under the run's root `<output.uri>/<namespace>/<name>/`:

    checkpoints/<run>/step-N/  resumable checkpoints of run <run> (the SFTJob's uid), each with a COMPLETE
                             marker: run, spec fingerprint, every file's sha256 (train stage; docs/recovery.md)
    adapter/                 the trained LoRA adapter + tokenizer (lora, qlora)       (train stage)
    model/                   the trained full model + tokenizer (method full)         (train stage)
    train/                   summary.json (steps, final loss, tokens), data_report.json (train stage)
    align/                   summary.json, data_report.json, the reference log-probabilities (align stage)
    align/checkpoints/<run>/step-N/  the align stage's resumable checkpoints, as checkpoints/ (align stage)
    aligned/                 the aligned adapter (lora, qlora) or model (full) + tokenizer (align stage);
                             with spec.alignment, eval and merge read it instead of adapter/ or model/
    eval/                    results.json, samples.jsonl                              (eval stage)
    merged/                  safetensors + tokenizer + generation config, verification.json (merge stage)
    report/                  report.md, loss_curve.png                                (`sftjob run` only)
    serving/                 serving.json: what to serve and how (docs/serving.md)   (the final stage)
    tracking/                mlflow.json: the MLflow run of this SFTJob (docs/tracking.md) (first tracked stage)
    manifest.json            every file above with size and sha256; written last, by the final stage

Beside the runs, `<output.uri>/<namespace>/_curated/<key>/` holds curated, tokenized data that every run of the
namespace with the same inputs reuses (curated_root; sftjob_trainer/curation/cache.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .serving import adapter_needs_merge
from .spec import SFTJobSpec
from .stage_table import Stage, merge_enabled, stages
from .status import Artifacts, ServingHandoff


def run_root(spec: SFTJobSpec, namespace: str, name: str) -> str:
    """`<output.uri>/<namespace>/<name>/`."""
    return f"{spec.output.uri.rstrip('/')}/{namespace}/{name}/"


def curated_root(output_uri: str, namespace: str) -> str:
    """`<output.uri>/<namespace>/_curated/`: an SFTJob name cannot begin with `_`, so no run lives there."""
    return f"{output_uri.rstrip('/')}/{namespace}/_curated/"


def _checkpoint_key(prefix: str) -> re.Pattern[str]:
    """`<prefix>/<run>/step-N/<file>`: the train stage's checkpoints/ or the align stage's align/checkpoints/."""
    return re.compile(rf"^{re.escape(prefix)}/([^/]+)/step-(\d+)/(.+)$")


# A run id names a checkpoint prefix: the SFTJob's metadata.uid (a UUID), or `sftjob run`'s own.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


class Layout:
    """Keys relative to the run root (the stores' keys; add the root for a URI)."""

    CHECKPOINTS = "checkpoints"
    CHECKPOINT_MARKER = "COMPLETE"
    ADAPTER = "adapter"
    MODEL = "model"
    TRAIN = "train"
    ALIGN = "align"
    ALIGNED = "aligned"
    EVAL = "eval"
    MERGED = "merged"
    REPORT = "report"
    SERVING = "serving"
    TRACKING = "tracking"
    MANIFEST = "manifest.json"
    ALIGN_CHECKPOINTS = "align/checkpoints"  # the align stage's, laid out as CHECKPOINTS
    # Where each group stage (the looping ones) keeps its checkpoints: the same format and protocol under each.
    STAGE_CHECKPOINTS = {Stage.TRAIN: CHECKPOINTS, Stage.ALIGN: ALIGN_CHECKPOINTS}
    ALIGN_SUMMARY = "align/summary.json"
    ALIGN_DATA_REPORT = "align/data_report.json"
    # the reference policy's log-probabilities of every preference pair (sftjob_trainer/align_stage.py)
    ALIGN_REFERENCE = "align/reference_logps.json"
    TRAIN_SUMMARY = "train/summary.json"
    DATA_REPORT = "train/data_report.json"
    EVAL_RESULTS = "eval/results.json"
    EVAL_SAMPLES = "eval/samples.jsonl"
    MERGE_VERIFICATION = "merged/verification.json"
    REPORT_MD = "report/report.md"
    LOSS_CURVE = "report/loss_curve.png"
    SERVING_MANIFEST = "serving/serving.json"
    MLFLOW_RUN = "tracking/mlflow.json"
    # Every prefix the manifest lists (the manifest itself is not listed).
    PREFIXES = (CHECKPOINTS, ADAPTER, MODEL, TRAIN, ALIGN, ALIGNED, EVAL, MERGED, REPORT, SERVING, TRACKING)

    @staticmethod
    def weights(method: str) -> str:
        """Where the train stage puts what it trained: the adapter, or the whole model for method full."""
        return Layout.MODEL if method == "full" else Layout.ADAPTER

    @staticmethod
    def final_weights(spec: SFTJobSpec) -> str:
        """What eval and merge read: the aligned weights when the spec aligns, else what training wrote."""
        return Layout.ALIGNED if spec.alignment is not None else Layout.weights(spec.method.type)

    @staticmethod
    def run_checkpoints(run_id: str, prefix: str = CHECKPOINTS) -> str:
        """The prefix of one run's checkpoints: a re-created SFTJob (another uid) has its own, so it neither
        resumes nor overwrites the old run's (docs/recovery.md, "Checkpoints and run identity"). `prefix`:
        CHECKPOINTS (train stage) or ALIGN_CHECKPOINTS (align stage), the same layout under each."""
        if not RUN_ID.match(run_id):
            raise ValueError(f"run id {run_id!r} does not match {RUN_ID.pattern}")
        return f"{prefix}/{run_id}"

    @staticmethod
    def checkpoint(run_id: str, step: int, prefix: str = CHECKPOINTS) -> str:
        return f"{Layout.run_checkpoints(run_id, prefix)}/step-{step}"

    @staticmethod
    def checkpoint_marker(run_id: str, step: int, prefix: str = CHECKPOINTS) -> str:
        return f"{Layout.checkpoint(run_id, step, prefix)}/{Layout.CHECKPOINT_MARKER}"

    @staticmethod
    def scan_checkpoints(
        keys: Iterable[str], run_id: str, prefix: str = CHECKPOINTS
    ) -> tuple[list[int], list[int]]:
        """Run `run_id`'s (complete steps, incomplete steps), ascending, from a listing of keys under the run
        root; other runs' checkpoints (and other prefixes') are not seen."""
        seen: set[int] = set()
        done: set[int] = set()
        pattern = _checkpoint_key(prefix)
        for k in keys:
            m = pattern.match(k)
            if m and m.group(1) == run_id:
                seen.add(int(m.group(2)))
                if m.group(3) == Layout.CHECKPOINT_MARKER:
                    done.add(int(m.group(2)))
        return sorted(done), sorted(seen - done)

    @staticmethod
    def newest_checkpoint(keys: Iterable[str], run_id: str, prefix: str = CHECKPOINTS) -> int | None:
        done, _ = Layout.scan_checkpoints(keys, run_id, prefix)
        return done[-1] if done else None

    @staticmethod
    def checkpoint_runs(keys: Iterable[str], prefix: str = CHECKPOINTS) -> list[str]:
        """Every run that has a complete checkpoint in a listing (e.g. earlier SFTJobs of the same name)."""
        runs = set()
        pattern = _checkpoint_key(prefix)
        for k in keys:
            m = pattern.match(k)
            if m and m.group(3) == Layout.CHECKPOINT_MARKER:
                runs.add(m.group(1))
        return sorted(runs)


def status_artifacts(spec: SFTJobSpec, namespace: str, name: str) -> Artifacts:
    """status.artifacts, computed from the spec alone (latestCheckpoint comes from the trainer's metrics)."""
    root = run_root(spec, namespace, name)
    runs = stages(spec)
    return Artifacts(
        root=root,
        checkpoints=f"{root}{Layout.CHECKPOINTS}/",
        adapter=f"{root}{Layout.final_weights(spec)}/",
        eval=f"{root}{Layout.EVAL}/" if Stage.EVAL in runs else None,
        merged=(spec.merge.uri or f"{root}{Layout.MERGED}/") if Stage.MERGE in runs else None,
        manifest=root + Layout.MANIFEST,
        serving=handoff(spec, root),
    )


def handoff(spec: SFTJobSpec, root: str) -> ServingHandoff:
    """What the run hands to spec.output.serving: the adapter when the server can load it, else the merged
    model (admission refuses the spec when merge is off), or the full model for method full."""
    server = spec.output.serving
    manifest = root + Layout.SERVING_MANIFEST
    if spec.method.type == "full":
        return ServingHandoff(
            server=server, artifact="model", uri=f"{root}{Layout.final_weights(spec)}/", manifest=manifest
        )
    problems = adapter_needs_merge(spec)
    if problems and merge_enabled(spec):
        why = "; ".join(str(p) for p in problems)
        return ServingHandoff(
            server=server,
            artifact="merged",
            uri=spec.merge.uri or f"{root}{Layout.MERGED}/",
            manifest=manifest,
            message=f"the merged model is handed off: {why}",
        )
    return ServingHandoff(
        server=server, artifact="adapter", uri=f"{root}{Layout.final_weights(spec)}/", manifest=manifest
    )


def checkpoint_uri(
    spec: SFTJobSpec, namespace: str, name: str, run_id: str, step: int, stage: Stage = Stage.TRAIN
) -> str:
    """The prefix of group stage `stage`'s checkpoint of `step` in run `run_id` (the SFTJob's uid)."""
    prefix = Layout.STAGE_CHECKPOINTS[stage]
    return f"{run_root(spec, namespace, name)}{Layout.checkpoint(run_id, step, prefix)}/"
