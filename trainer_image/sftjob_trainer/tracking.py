"""MLflow tracking of a stage (spec.tracking.mlflow; docs/tracking.md).

One MLflow run per SFTJob: the first stage that reaches the server creates it and writes its id to the
artifact store (`Layout.MLFLOW_RUN`); every later stage and retry reads that and logs into the same run.

Tracking must never fail or stall training: every MLflow call runs on one background thread, in order; the
first failure is logged as a warning (`{"event": "warning", "component": "tracking", ...}`) and tracking is
off for the rest of the stage. The caller only waits in `flush`/`close`, each bounded. The MLflow client's
own HTTP retries are lowered (unless set in the environment) so an unreachable server is given up on in
seconds, not minutes. Credentials reach the client only as its own environment variables (from a Secret).
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sftjob_api import Layout, SFTJobSpec
from sftjob_api.storage import Store
from sftjob_api.tracking import MlflowSpec, TrackingStatus, tracking_message
from sftjob_api.trainer_config import TrainerConfig

from .metrics import log_json

# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) would stall a stage for minutes on a dead
# server; an explicit environment setting wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch (MLflow's limit)
METRICS_BATCH = 1000
FLUSH_SECONDS = 120.0

Op = Callable[[], None]


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """The spec as MLflow params: nested keys joined with dots (lists of objects by index), lists of
    scalars as JSON, unset (null) fields left out, values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(doc, list) and any(isinstance(x, dict | list) for x in doc):
        for i, v in enumerate(doc):
            out.update(flatten(v, f"{prefix}{i}."))
    elif doc is not None:
        text = json.dumps(doc) if isinstance(doc, list) else str(doc)
        out[prefix.rstrip(".")] = text[:MAX_PARAM_VALUE]
    return out


def spec_params(cfg: TrainerConfig) -> dict[str, str]:
    """Every field of the SFTJob spec (defaults included), by its wire name: e.g. training.learningRate."""
    return flatten(cfg.model_dump(mode="json", include=set(SFTJobSpec.model_fields)))


class Tracker:
    """MLflow logging of one stage. Every method returns at once (or within its bound) and never raises."""

    def __init__(self, cfg: TrainerConfig, store: Store, stage: str, enabled: bool = True) -> None:
        self.cfg = cfg
        self.store = store
        self.stage = stage
        self.spec: MlflowSpec | None = cfg.tracking.mlflow if cfg.tracking else None
        self.enabled = enabled and self.spec is not None
        self.run: TrackingStatus | None = None
        self.client: Any = None
        self.resumed = False
        self._ops: queue.Queue[Op | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._ops.put(self._open)
            self._thread = threading.Thread(target=self._work, name="mlflow-tracking", daemon=True)
            self._thread.start()

    # ---- what the stages call -----------------------------------------------------------------------------

    def metrics(self, values: dict[str, float | int | None], step: int = 0) -> None:
        """Numeric values (None skipped) at `step`; queued, sent in batches."""
        if self.enabled:
            clean = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
            ts = int(time.time() * 1000)
            self._ops.put(_MetricsOp(self, clean, step, ts))

    def artifact(self, key: str) -> None:
        """The store object `key` (relative to the run root) as an artifact under its directory; skipped when
        the store does not have it."""
        if self.enabled:
            self._ops.put(lambda: self._log_artifact(key))

    def log_eval(self) -> None:
        """eval/results.json: the fine-tuned model's metrics (eval_loss, eval_perplexity, ...), the base
        model's (base_eval_loss, ...) and whether the gates held, at the last training step; the file itself
        as an artifact."""
        if self.enabled:
            self._ops.put(self._log_eval)
            self.artifact(Layout.EVAL_RESULTS)

    def _log_eval(self) -> None:
        results = self.store.read_json(Layout.EVAL_RESULTS) or {}
        step = int((self.store.read_json(Layout.TRAIN_SUMMARY) or {}).get("steps") or 0)
        values: dict[str, float | int | None] = {"eval_gates_passed": int(bool(results.get("gates_passed")))}
        for prefix, res in (("", results.get("trained")), ("base_", results.get("base"))):
            for k, v in (res or {}).items():
                values[prefix + (k if k.startswith("eval_") else f"eval_{k}")] = v
        self.metrics(values, step)

    def flush(self, timeout: float = FLUSH_SECONDS) -> bool:
        """Wait (at most `timeout`) until everything queued was sent or given up on."""
        if not self.enabled or self._thread is None:
            return True
        done = threading.Event()
        self._ops.put(done.set)
        if not done.wait(timeout):
            self._warn(
                f"the tracking server did not take the logged data within {timeout:.0f}s", disable=True
            )
            return False
        return True

    def close(
        self, final: bool = False, failed: bool = False, timeout: float = FLUSH_SECONDS
    ) -> TrackingStatus | None:
        """Send what is queued; end the MLflow run when this stage ends the SFTJob (`final`: FINISHED, or
        FAILED when `failed`). Returns the run, None when the stage was not tracked."""
        if final and self.enabled:
            status = "FAILED" if failed else "FINISHED"
            self._ops.put(lambda: self._client_call("set_terminated", status=status))
        self.flush(timeout)
        if self._thread is not None:
            self._ops.put(None)
            self._thread.join(1.0)
            self._thread = None
        if self.run is not None:
            log_json(
                "tracking",
                stage=self.stage,
                **self.run.model_dump(mode="json", exclude_none=True),
                resumed=self.resumed,
                tracked=self.enabled,
            )
        return self.run

    # ---- the background thread ----------------------------------------------------------------------------

    def _work(self) -> None:
        pending: deque[Op | None] = deque()  # taken from the queue while merging metrics, not yet run
        while True:
            op = pending.popleft() if pending else self._ops.get()
            if op is None:
                return
            if isinstance(op, _MetricsOp):  # consecutive metrics go in one request
                while len(op.items) < METRICS_BATCH:
                    try:
                        nxt = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, _MetricsOp):
                        pending.append(nxt)
                        break
                    op.items += nxt.items
            try:
                op()
            except Exception as e:  # any tracking failure: warn once, go on untracked
                self._warn(f"{type(e).__name__}: {e}", disable=True)

    def _warn(self, message: str, disable: bool) -> None:
        if self.enabled:
            log_json(
                "warning",
                component="tracking",
                stage=self.stage,
                message=f"MLflow tracking failed, training goes on untracked: {message[:500]}",
            )
        if disable:
            self.enabled = False

    def _client_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self.run is None:
            return None
        return getattr(self.client, name)(self.run.mlflow_run_id, *args, **kwargs)

    def _open(self) -> None:
        """Connect, find or create the experiment, then resume the SFTJob's run or create it."""
        assert self.spec is not None
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow import MlflowClient

        spec = self.spec
        self.client = client = MlflowClient(tracking_uri=spec.tracking_uri)
        known = self._known_run()
        if known is not None and known.mlflow_run_id:
            run = self._get_run(known.mlflow_run_id)
            if run is not None and run.info.lifecycle_stage == "active":
                self.run, self.resumed = known, True
                if run.info.status != "RUNNING":
                    client.update_run(known.mlflow_run_id, status="RUNNING")
                return
        exp = client.get_experiment_by_name(spec.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(spec.experiment)
            except Exception:  # created meanwhile by someone else
                exp = client.get_experiment_by_name(spec.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        r = self.cfg.run
        tags = {
            "sftjob.namespace": r.namespace,
            "sftjob.name": r.name,
            "sftjob.outputRoot": r.output_root,
            **spec.tags,
        }
        created = client.create_run(exp_id, tags=tags, run_name=spec.run_name or f"{r.namespace}/{r.name}")
        self.run = TrackingStatus(
            mlflow_run_id=created.info.run_id,
            mlflow_experiment_id=str(exp_id),
            mlflow_tracking_uri=spec.tracking_uri,
        )
        # The id first (a retry must find this run), then the params.
        self.store.put_bytes(
            json.dumps(self.run.model_dump(mode="json"), indent=1).encode(), Layout.MLFLOW_RUN
        )
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in sorted(spec_params(self.cfg).items())]
        for i in range(0, len(params), BATCH):
            client.log_batch(created.info.run_id, params=params[i : i + BATCH])

    def _known_run(self) -> TrackingStatus | None:
        """The run an earlier stage or attempt of this SFTJob created on this tracking server."""
        doc = self.store.read_json(Layout.MLFLOW_RUN)
        if not doc:
            return None
        known = TrackingStatus.model_validate(doc)
        if known.mlflow_run_id and known.mlflow_tracking_uri == (self.spec and self.spec.tracking_uri):
            return known
        return None

    def _get_run(self, run_id: str) -> Any:
        """The run, or None when the server does not know it (deleted, or a new server database)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _log_artifact(self, key: str) -> None:
        if not self.enabled or not self.store.exists(key):
            return
        with tempfile.TemporaryDirectory(prefix="sftjob-mlflow-") as d:
            path = os.path.join(d, os.path.basename(key))
            with open(path, "wb") as f:
                for block in self.store.iter_bytes(key):
                    f.write(block)
            self._client_call("log_artifact", path, os.path.dirname(key) or None)


class _MetricsOp:
    """A queued log_batch of metrics (the worker merges consecutive ones)."""

    def __init__(self, tracker: Tracker, values: dict[str, float], step: int, ts: int) -> None:
        self.tracker = tracker
        self.items = [(k, v, step, ts) for k, v in values.items()]

    def __call__(self) -> None:
        from mlflow.entities import Metric

        if self.items:
            self.tracker._client_call(
                "log_batch", metrics=[Metric(k, v, ts, s) for k, v, s, ts in self.items]
            )


def termination_message(cfg: TrainerConfig, run: TrackingStatus | None, **extra: Any) -> None:
    """Write the stage's JSON termination message (Kubernetes terminationMessagePath): `extra` (e.g.
    evalResults) plus the tracked run, from which the operator fills status.tracking."""
    doc = {**extra, **(tracking_message(run) if run is not None else {})}
    path = cfg.runtime.termination_log or os.environ.get("SFTJOB_TERMINATION_LOG")
    if path and doc:
        with open(path, "w") as f:
            f.write(json.dumps(doc))
