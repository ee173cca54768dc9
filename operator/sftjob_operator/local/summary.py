"""The end of `sftjob run`: report/ (report.md, loss_curve.png) next to the artifacts, and the printed summary
(phase wall times, data, training, base vs fine-tuned metrics)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING

from sftjob_api import Layout, SFTJob, final_stage
from sftjob_api.manifest import close_run

from . import report
from .process import read_steps

if TYPE_CHECKING:
    from .stage_run import Run


def write_report(r: Run, job: SFTJob, spec_path: str) -> None:
    """report/loss_curve.png + report/report.md, then the manifest again so it lists them (still last)."""
    store = r.store
    results = store.read_json(Layout.EVAL_RESULTS)
    try:
        samples = [json.loads(x) for x in store.get_bytes(Layout.EVAL_SAMPLES).decode().splitlines()]
    except Exception:
        samples = []
    with tempfile.TemporaryDirectory() as d:
        evals = {}
        if results and (results.get("base") or {}).get("eval_loss") is not None:
            evals = {
                "eval loss, base": results["base"]["eval_loss"],
                "eval loss, fine-tuned": results["trained"]["eval_loss"],
            }
        png = report.loss_curve_png(
            read_steps(r.steps_file),
            os.path.join(d, "loss_curve.png"),
            f"SFTJob {job.metadata.name}: training loss",
            evals,
        )
        md = report.markdown_report(
            job.metadata.name,
            spec_path,
            r.timings,
            results,
            store.read_json(Layout.TRAIN_SUMMARY),
            store.read_json(Layout.MERGE_VERIFICATION),
            samples,
            r.cfg.run.output_root,
            png,
        )
        with open(os.path.join(d, "report.md"), "w") as f:
            f.write(md)
        store.upload_dir(d, Layout.REPORT)
    cfg = r.cfg
    close_run(store, cfg, final_stage(cfg))


def print_summary(r: Run) -> None:
    summary = r.store.read_json(Layout.TRAIN_SUMMARY) or {}
    results = r.store.read_json(Layout.EVAL_RESULTS)
    echo = r.echo
    echo("")
    if r.timings:
        echo(report.render_table(("phase", "wall time"), [(k, f"{v:.0f}s") for k, v in r.timings.items()]))
        echo("")
    for line in report.data_lines(r.store.read_json(Layout.DATA_REPORT)):
        echo(line)
    if summary:
        echo(
            f"training: {summary.get('steps')} steps, {summary.get('tokens')} tokens, "
            f"final train loss {summary.get('final_loss', float('nan')):.4f}"
        )
    align = r.store.read_json(Layout.ALIGN_SUMMARY)
    if align:
        final = align.get("final") or {}
        echo(
            f"alignment ({align.get('loss')} DPO, beta {align.get('beta')}"
            + (f", SFT term {align['sft_loss_weight']}" if align.get("sft_loss_weight") else "")
            + f"): {align.get('steps')} steps, final"
            f" loss {align.get('final_loss', float('nan')):.4f}, train reward accuracy"
            f" {final.get('reward_accuracy', float('nan')):.3f}, margin {final.get('reward_margin', float('nan')):.4f}"
        )
    if results:
        echo(
            report.render_table(
                ("held-out metric", *report.eval_header(results)[1:]), report.eval_table(results)
            )
        )
        if results.get("failed_gates"):
            echo("failed gates: " + "; ".join(results["failed_gates"]))
    if r.cfg.tracking and r.cfg.tracking.mlflow:
        echo(report.tracking_line(r.store.read_json(Layout.MLFLOW_RUN), r.cfg.tracking.mlflow.tracking_uri))
    echo(f"\nartifacts: {r.cfg.run.output_root}  (manifest.json, report/report.md, report/loss_curve.png)")
