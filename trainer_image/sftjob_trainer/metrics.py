"""Prometheus metrics per rank and JSON log lines on rank 0.

The names are `sftjob_api.metric_names` (the operator's progress reader, the dashboards and the alert rules
read them); labels are namespace/sftjob/rank (plus those metric_names lists for the data metrics).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sftjob_api import metric_names as m


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class TrainerMetrics:
    def __init__(self, namespace: str, job: str, rank: int, port: int | None, align: bool = False) -> None:
        self.registry = CollectorRegistry()
        # not `job`: that is Prometheus' target label
        self.labels = dict(zip(m.LABELS, (namespace, job, str(rank)), strict=True))
        names = list(self.labels)
        r = self.registry

        def g(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=r).labels(**self.labels)

        self.loss = g(m.TRAIN_LOSS, "Mean token loss of the last optimizer step")
        self.lr = g(m.LEARNING_RATE, "Learning rate of the last optimizer step")
        self.step = g(m.TRAIN_STEP, "Optimizer steps done")
        self.total_steps = g(m.TRAIN_TOTAL_STEPS, "Optimizer steps planned")
        self.epoch = g(m.TRAIN_EPOCH, "Fractional epoch")
        self.tokens = Counter(
            m.TRAIN_TOKENS, "Real (non-padding) tokens processed by this rank", names, registry=r
        ).labels(**self.labels)
        self.tps = g(m.TRAIN_TOKENS_PER_SECOND, "Real tokens/s over all ranks, last step")
        self.grad_norm = g(m.TRAIN_GRAD_NORM, "Gradient norm before clipping")
        self.eta = g(m.TRAIN_ETA_SECONDS, "Estimated seconds to the end of training")
        self.memory = g(m.MEMORY_USED_BYTES, "GPU memory allocated when on GPU, else resident memory")
        self.gpu_memory = g(m.GPU_MEMORY_BYTES, "Peak GPU memory allocated (0 on CPU)")
        self.ckpt_seconds = Histogram(
            m.CHECKPOINT_SAVE_SECONDS,
            "Time to save and upload one checkpoint",
            names,
            registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
        ).labels(**self.labels)
        self.dropped = Counter(
            m.DATA_ROWS_DROPPED, "Dataset rows dropped, by reason", [*names, "reason"], registry=r
        )
        self.source_rows = Gauge(
            m.DATA_SOURCE_ROWS,
            "Training samples drawn from each source (after curation and mixing)",
            [*names, "source"],
            registry=r,
        )
        self.train_examples = Gauge(
            m.DATA_TRAIN_EXAMPLES,
            "Training samples after curation and mixing (labels: their content hash, read from the cache)",
            [*names, "content_hash", "reused"],
            registry=r,
        )
        self.resumed_step = g(m.TRAIN_RESUMED_FROM_STEP, "Checkpoint step this run resumed from (0: none)")
        self.checkpoint_step = g(
            m.TRAIN_CHECKPOINT_STEP, "Step of the newest checkpoint this run saved (0: none)"
        )
        # the align stage's per-step means (dpo.STATS order), only in its pods
        self.align = (
            {
                "rewards_chosen": g(m.ALIGN_REWARDS_CHOSEN, "Mean reward of the chosen responses"),
                "rewards_rejected": g(m.ALIGN_REWARDS_REJECTED, "Mean reward of the rejected responses"),
                "reward_margin": g(m.ALIGN_REWARD_MARGIN, "Mean reward margin (chosen - rejected)"),
                "reward_accuracy": g(m.ALIGN_REWARD_ACCURACY, "Share of pairs whose chosen reward is higher"),
                "logps_chosen": g(
                    m.ALIGN_LOGPS_CHOSEN, "Mean policy log-probability of the chosen responses"
                ),
                "logps_rejected": g(m.ALIGN_LOGPS_REJECTED, "Mean policy log-probability of the rejected"),
                "ref_logps_chosen": g(m.ALIGN_REF_LOGPS_CHOSEN, "Mean reference log-probability, chosen"),
                "ref_logps_rejected": g(
                    m.ALIGN_REF_LOGPS_REJECTED, "Mean reference log-probability, rejected"
                ),
            }
            if align
            else {}
        )
        self.port = None
        if port:
            self.server, _ = start_http_server(
                port, addr=os.environ.get("SFTJOB_METRICS_ADDR", "0.0.0.0"), registry=r
            )
            self.port = self.server.server_port

    def record_data(self, report: dict[str, Any], reused: bool) -> None:
        """The curated data (DataReport.as_dict()): drops by reason, samples per source, the set's size."""
        for reason, n in report["dropped"].items():
            self.dropped.labels(**self.labels, reason=reason).inc(n)
        for source, src in report["sources"].items():
            self.source_rows.labels(**self.labels, source=source).set(src["mixed_rows"])
        self.train_examples.labels(
            **self.labels, content_hash=report["content_hash"], reused=str(reused).lower()
        ).set(report["train_examples"])

    def record_align(self, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            if name in self.align:
                self.align[name].set(value)

    def sample_memory(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                self.memory.set(torch.cuda.memory_allocated())
                self.gpu_memory.set(torch.cuda.max_memory_allocated())
                return
        except ImportError:
            pass
        self.memory.set(rss_bytes())


def log_json(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout (rank 0 only by convention of the callers)."""
    rec = {"ts": round(time.time(), 3), "event": event, **fields}
    sys.stdout.write(json.dumps(rec, default=str) + "\n")
    sys.stdout.flush()
