"""Every dashboard panel answers with data from real sources: a real Prometheus scrapes a real trainer
(tiny Llama, DeepSpeed on CPU, its /metrics on loopback) and the operator, which has just taken an SFTJob
through every phase on the real control plane. Only the dcgm-exporter panels are left out: no GPU here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import apply, sftjob, wait_phase
from testbed.procs import free_port
from trainer.runner import launch_cmd, make_config, trainer_env, write_config
from trainer.tiny import dataset_rows, make_model_dir

from sftjob_operator.dashboards import all_panels

pytestmark = [pytest.mark.e2e, pytest.mark.trainer]


def promql(expr: str, namespace: str, name: str) -> str:
    """A panel expression with the dashboard variables set to this test's SFTJob."""
    return expr.replace("$namespace", namespace).replace("$sftjob", name)


def write_dataset(path: Path) -> str:
    rows = dataset_rows(400, seed=1)
    lines = [json.dumps(r) for r in rows] + [json.dumps(rows[0]), "{not json"]  # a duplicate, a malformed row
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def trainer(tmp_path: Path, namespace: str):
    """A long trainer run exporting metrics on 127.0.0.1; stopped when the test ends."""
    model = make_model_dir(str(tmp_path / "model"))
    port = free_port()
    cfg = make_config(
        model,
        write_dataset(tmp_path / "train.jsonl"),
        str(tmp_path / "out"),
        str(tmp_path / "work"),
        max_steps=100_000,
        checkpoint_steps=5,
        global_batch=4,
        micro=4,
    )
    cfg["run"] = {"namespace": namespace, "name": "obs", "outputRoot": str(tmp_path / "out")}
    cfg["runtime"]["metricsPort"] = port
    config = write_config(str(tmp_path / "config.json"), cfg)
    env = trainer_env({"SFTJOB_METRICS_ADDR": "127.0.0.1"})
    log = open(tmp_path / "trainer.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(launch_cmd(config, 1, free_port()), env=env, stdout=log, stderr=subprocess.STDOUT)
    yield port, proc, tmp_path / "trainer.log"
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_every_dashboard_panel_returns_data(
    sftjob_crd: Any, namespace: str, start_operator: Any, prometheus: Any, trainer: Any
) -> None:
    trainer_port, trainer_proc, trainer_log = trainer
    op = start_operator()
    prometheus.add_target("sftjob-operator", f"127.0.0.1:{op.metrics_port}")
    prometheus.add_target("sftjob-trainer", f"127.0.0.1:{trainer_port}")

    # The eval pod "writes" its results to its termination message, as the real eval stage does.
    annotations = {
        "kwok.sftjob.dev/delay": "2s",
        "kwok.sftjob.dev/message": json.dumps({"evalResults": {"evalLoss": 1.25}}),
    }
    apply(sftjob_crd, namespace, sftjob("obs", resources={"gpusPerNode": 1, "podAnnotations": annotations}))
    assert (
        wait_phase(sftjob_crd, namespace, "obs", ("Succeeded", "Failed"), timeout=120, op=op)["phase"]
        == "Succeeded"
    )

    prometheus.query(
        promql('sft_train_step{namespace=~"$namespace", sftjob=~"$sftjob"}', namespace, "obs"), 120
    )
    # dcgm-exporter panels: GPUs are simulated here; the DPO panels (only=spec.alignment): this trainer runs
    # no align stage
    panels = [p for p in all_panels() if not p.needs and not p.only]
    missing = []
    for panel in panels:
        expr = promql(panel.expr, namespace, "obs")
        try:
            prometheus.query(expr, timeout=60)
        except TimeoutError:
            missing.append(f"{panel.title}: {expr}")
    # The real trainer reports each checkpoint once saved (checkpoint_steps=5): what latestCheckpoint reads.
    ckpt = prometheus.query(
        promql(
            'sft_train_checkpoint_step{namespace=~"$namespace", sftjob=~"$sftjob", rank="0"} >= 5',
            namespace,
            "obs",
        ),
        timeout=120,
    )
    step = int(float(ckpt[0]["value"][1]))
    saved = [
        int(m.parent.name.removeprefix("step-"))
        for m in trainer_log.parent.glob("out/checkpoints/*/*/COMPLETE")  # checkpoints/<run>/step-N/
    ]
    # that checkpoint is complete on disk (or already rotated out by newer ones: keepCheckpoints is 2)
    assert step in saved or len([s for s in saved if s > step]) >= 2, (step, saved)
    assert trainer_proc.poll() is None, f"trainer exited early:\n{trainer_log.read_text()[-3000:]}"
    assert not missing, "panels without data:\n" + "\n".join(missing)
    assert len(panels) >= 18
