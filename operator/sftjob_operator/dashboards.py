"""Grafana dashboards for the Helm chart, generated from a short list of panels (pure functions).

    python -m sftjob_operator.dashboards --write   # regenerate helm/sftjob-operator/dashboards/*.json
    python -m sftjob_operator.dashboards --check   # exit 1 if the committed JSON is stale

Trainer series carry the labels namespace, sftjob and rank (`job` is Prometheus' own target label).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftjob_api import metric_names as m

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "helm" / "sftjob-operator" / "dashboards"
SEL = 'namespace=~"$namespace", sftjob=~"$sftjob"'
RANK0 = SEL + ', rank="0"'


@dataclass(frozen=True)
class Panel:
    title: str
    expr: str
    unit: str = "short"
    legend: str = "{{namespace}}/{{sftjob}}"
    kind: str = "timeseries"  # timeseries | stat | state-timeline
    description: str = ""
    needs: str | None = None  # an exporter outside this project the panel reads (e.g. dcgm-exporter)
    only: str | None = None  # the runs whose trainers export the panel's series (e.g. spec.alignment)


TRAINING_PANELS = [
    Panel(
        "Training loss",
        f"{m.TRAIN_LOSS}{{{RANK0}}}",
        description="Mean loss of the last optimizer step (rank 0); while aligning (spec.alignment), the DPO"
        " loss of the align stage's steps.",
    ),
    Panel(
        "Eval loss",
        f"sftjob_operator_job_eval_loss{{{SEL}}}",
        description="Held-out loss from the evaluation stage.",
    ),
    Panel(
        "Learning rate",
        f"{m.LEARNING_RATE}{{{RANK0}}}",
        description="Scheduler output (warmup, then cosine).",
    ),
    Panel(
        "Tokens per second (all ranks)",
        f"sum by (namespace, sftjob) (rate({m.TRAIN_TOKENS}_total{{{SEL}}}[1m]))",
        unit="short",
        description="Real (non-padding) tokens trained per second, summed over ranks.",
    ),
    Panel(
        "Progress",
        f"100 * {m.TRAIN_STEP}{{{RANK0}}} / {m.TRAIN_TOTAL_STEPS}{{{RANK0}}}",
        unit="percent",
        kind="stat",
        description="Optimizer steps done over steps planned.",
    ),
    Panel(
        "ETA", f"{m.TRAIN_ETA_SECONDS}{{{RANK0}}}", unit="s", kind="stat", description="Estimated time left."
    ),
    Panel(
        "Gradient norm",
        f"{m.TRAIN_GRAD_NORM}{{{RANK0}}}",
        description="Global gradient norm before clipping; spikes precede loss explosions.",
    ),
    Panel(
        "Checkpoint save duration",
        f"rate({m.CHECKPOINT_SAVE_SECONDS}_sum{{{RANK0}}}[15m]) / rate({m.CHECKPOINT_SAVE_SECONDS}_count{{{RANK0}}}[15m])",
        unit="s",
        description="Mean time to write a checkpoint (all shards + COMPLETE marker).",
    ),
    Panel(
        "Newest checkpoint",
        f'max by (namespace, sftjob) ({{__name__=~"{m.TRAIN_CHECKPOINT_STEP}|{m.TRAIN_RESUMED_FROM_STEP}", {RANK0}}})',
        kind="stat",
        description="Step of the newest complete checkpoint: saved by this run, else the one it resumed from"
        " (status.artifacts.latestCheckpoint names its prefix).",
    ),
    Panel(
        "Memory in use",
        f"{m.MEMORY_USED_BYTES}{{{SEL}}}",
        unit="bytes",
        legend="{{sftjob}} rank {{rank}}",
        description="GPU memory allocated by torch per rank; process RSS on CPU.",
    ),
    Panel(
        "Samples dropped",
        f"sum by (namespace, sftjob, reason) ({m.DATA_ROWS_DROPPED}_total{{{RANK0}}})",
        legend="{{sftjob}} {{reason}}",
        description="Rows the data pipeline dropped, by reason (malformed, too long, duplicate, ...).",
    ),
    Panel(
        "GPU utilization",
        'DCGM_FI_DEV_GPU_UTIL{namespace=~"$namespace", pod=~"$sftjob-(train|align)-.*"}',
        unit="percent",
        legend="{{pod}} gpu {{gpu}}",
        description="From NVIDIA dcgm-exporter, where it runs.",
        needs="dcgm-exporter",
    ),
    Panel(
        "GPU memory used",
        'DCGM_FI_DEV_FB_USED{namespace=~"$namespace", pod=~"$sftjob-(train|align)-.*"} * 1024 * 1024',
        unit="bytes",
        legend="{{pod}} gpu {{gpu}}",
        description="Framebuffer in use, from NVIDIA dcgm-exporter, where it runs.",
        needs="dcgm-exporter",
    ),
    Panel(
        "Phase timeline",
        'sftjob_operator_job_phase{namespace=~"$namespace", sftjob=~"$sftjob"} == 1',
        legend="{{sftjob}} {{phase}}",
        kind="state-timeline",
        description="The SFTJob's phase over time, from the operator.",
    ),
]

ALIGNED = "spec.alignment"
# The align stage's DPO metrics (per optimizer step, means over its pairs; docs/alignment.md): rank 0's.
ALIGNMENT_PANELS = [
    Panel(
        "DPO rewards: chosen vs rejected",
        f'{{__name__=~"{m.ALIGN_REWARDS_CHOSEN}|{m.ALIGN_REWARDS_REJECTED}", {RANK0}}}',
        legend="{{sftjob}} {{__name__}}",
        description="Implicit rewards beta x (policy - reference) log-probability of the chosen and of the"
        " rejected responses; they should move apart.",
        only=ALIGNED,
    ),
    Panel(
        "DPO reward margin",
        f"{m.ALIGN_REWARD_MARGIN}{{{RANK0}}}",
        description="Chosen reward minus rejected reward (mean over the step's pairs); rising while aligning.",
        only=ALIGNED,
    ),
    Panel(
        "DPO reward accuracy",
        f"{m.ALIGN_REWARD_ACCURACY}{{{RANK0}}}",
        unit="percentunit",
        description="Share of the step's pairs whose chosen response gets the higher reward.",
        only=ALIGNED,
    ),
    Panel(
        "DPO log-probabilities: policy vs reference",
        f'{{__name__=~"{m.ALIGN_LOGPS_CHOSEN}|{m.ALIGN_LOGPS_REJECTED}|{m.ALIGN_REF_LOGPS_CHOSEN}'
        f'|{m.ALIGN_REF_LOGPS_REJECTED}", {RANK0}}}',
        legend="{{sftjob}} {{__name__}}",
        description="Summed log-probabilities of the chosen and rejected responses under the policy and the"
        " reference (the SFT result); the policy's chosen should not fall far below the reference's.",
        only=ALIGNED,
    ),
]

OPERATOR_PANELS = [
    Panel(
        "SFTJobs by phase",
        "sum by (phase) (sftjob_operator_jobs)",
        legend="{{phase}}",
        kind="stat",
        description="SFTJobs the operator currently sees, by phase.",
    ),
    Panel(
        "Phase transitions",
        "sum by (from_phase, to_phase) (increase(sftjob_operator_phase_transitions_total[5m]))",
        legend="{{from_phase}} -> {{to_phase}}",
        description="Phase changes in the last 5 minutes.",
    ),
    Panel(
        "Time to training p95",
        "histogram_quantile(0.95, sum by (le) (rate(sftjob_operator_time_to_training_seconds_bucket[1h])))",
        unit="s",
        legend="p95",
        description="From creation to the first trainer pod running.",
    ),
    Panel(
        "Handler invocations",
        "sum by (handler) (rate(sftjob_operator_handler_invocations_total[5m]))",
        legend="{{handler}}",
        unit="ops",
        description="kopf handler calls per second.",
    ),
    Panel(
        "Reconcile errors",
        "sum by (handler) (rate(sftjob_operator_handler_errors_total[5m]))",
        legend="{{handler}}",
        unit="ops",
        description="Handler calls that raised, per second (kopf retries them).",
    ),
    Panel(
        "Handler latency p95",
        "histogram_quantile(0.95, sum by (le, handler) (rate(sftjob_operator_handler_duration_seconds_bucket[5m])))",
        legend="{{handler}}",
        unit="s",
        description="95th percentile of handler duration.",
    ),
    Panel(
        "Group restarts",
        "sum by (cause) (increase(sftjob_operator_recoveries_total[1h]))",
        legend="{{cause}}",
        description="Training and alignment groups restarted from a checkpoint, by cause (Failed, Disrupted,"
        " Stalled, Resized: an elastic group re-formed at another size);"
        " docs/recovery.md.",
    ),
    Panel(
        "Recovery time p90",
        "histogram_quantile(0.9, sum by (le) (rate(sftjob_operator_recovery_seconds_bucket[1h])))",
        legend="p90",
        unit="s",
        description="From a group restart to the first step of that group seen after it.",
    ),
]


def _panel_json(panel: Panel, index: int) -> dict[str, Any]:
    width = 12 if panel.kind != "stat" else 6
    per_row = 24 // width
    return {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description
        + (f" Needs {panel.needs}." if panel.needs else "")
        + (f" Only runs with {panel.only}." if panel.only else ""),
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": (index % per_row) * width, "y": (index // per_row) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {},
        "targets": [{"refId": "A", "expr": panel.expr, "legendFormat": panel.legend}],
    }


def _variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard(uid: str, title: str, panels: list[Panel], with_job_variables: bool) -> dict[str, Any]:
    variables: list[dict[str, Any]] = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
    ]
    if with_job_variables:
        variables += [
            _variable("namespace", f"label_values({m.TRAIN_STEP}, namespace)"),
            _variable("sftjob", f'label_values({m.TRAIN_STEP}{{namespace=~"$namespace"}}, sftjob)'),
        ]
    return {
        "uid": uid,
        "title": title,
        "tags": ["sftjob"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": variables},
        "panels": [_panel_json(p, i) for i, p in enumerate(panels)],
    }


DASHBOARDS = {
    "sftjob-training.json": dashboard(
        "sftjob-training", "SFTJob training", TRAINING_PANELS + ALIGNMENT_PANELS, True
    ),
    "sftjob-operator.json": dashboard("sftjob-operator", "SFTJob operator", OPERATOR_PANELS, False),
}


def all_panels() -> list[Panel]:
    return TRAINING_PANELS + ALIGNMENT_PANELS + OPERATOR_PANELS


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name], indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = DASHBOARD_DIR / name
        if args.write:
            path.write_text(render(name))
        elif not path.exists() or path.read_text() != render(name):
            stale.append(str(path))
    if args.check and stale:
        print(f"stale: {stale}; run python -m sftjob_operator.dashboards --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
