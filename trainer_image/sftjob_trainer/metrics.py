"""Prometheus metrics per rank and JSON log lines on rank 0.

Names follow Prometheus conventions; labels are namespace/sftjob/rank only (plus `reason` on the drop counter).
The operator's progress reader (sftjob_operator.render.progress) reads sft_train_step, sft_train_total_steps,
sft_train_loss, sft_train_tokens_per_second, sft_train_eta_seconds and sft_train_epoch from rank 0, and
sft_train_checkpoint_step / sft_train_resumed_from_step for status.artifacts.latestCheckpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class TrainerMetrics:
    def __init__(self, namespace: str, job: str, rank: int, port: int | None) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"namespace": namespace, "sftjob": job, "rank": str(rank)}  # `job` is Prometheus' target label
        names = list(self.labels)
        r = self.registry

        def g(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=r).labels(**self.labels)

        self.loss = g("sft_train_loss", "Mean token loss of the last optimizer step")
        self.lr = g("sft_learning_rate", "Learning rate of the last optimizer step")
        self.step = g("sft_train_step", "Optimizer steps done")
        self.total_steps = g("sft_train_total_steps", "Optimizer steps planned")
        self.epoch = g("sft_train_epoch", "Fractional epoch")
        self.tokens = Counter("sft_train_tokens", "Real (non-padding) tokens processed by this rank",
                              names, registry=r).labels(**self.labels)
        self.tps = g("sft_train_tokens_per_second", "Real tokens/s over all ranks, last step")
        self.grad_norm = g("sft_train_grad_norm", "Gradient norm before clipping")
        self.eta = g("sft_train_eta_seconds", "Estimated seconds to the end of training")
        self.memory = g("sft_memory_used_bytes", "GPU memory allocated when on GPU, else resident memory")
        self.gpu_memory = g("sft_gpu_memory_bytes", "Peak GPU memory allocated (0 on CPU)")
        self.ckpt_seconds = Histogram("sft_checkpoint_save_duration_seconds",
                                      "Time to save and upload one checkpoint", names, registry=r,
                                      buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800)).labels(**self.labels)
        self.dropped = Counter("sft_data_rows_dropped", "Dataset rows dropped, by reason",
                               [*names, "reason"], registry=r)
        self.resumed_step = g("sft_train_resumed_from_step", "Checkpoint step this run resumed from (0: none)")
        self.checkpoint_step = g("sft_train_checkpoint_step", "Step of the newest checkpoint this run saved (0: none)")
        self.port = None
        if port:
            self.server, _ = start_http_server(port, addr=os.environ.get("SFTJOB_METRICS_ADDR", "0.0.0.0"),
                                               registry=r)
            self.port = self.server.server_port

    def record_drops(self, dropped: dict[str, int]) -> None:
        for reason, n in dropped.items():
            self.dropped.labels(**self.labels, reason=reason).inc(n)

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
