"""What `sftjob run` shows and leaves behind: the summary table, the loss curve and report.md (pure-ish)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

ROWS = (
    ("eval_loss", "eval loss", "lower"),
    ("perplexity", "perplexity", "lower"),
    ("rouge_l", "ROUGE-L", "higher"),
    ("exact_match", "exact match", "higher"),
    # spec.alignment, on the held-out pairs: which response the model itself finds more likely (base, SFT,
    # aligned), and the implicit reward beta * (policy - SFT) of the aligned model (0 for SFT by definition)
    ("chosen_logp_accuracy", "prefers chosen (log-prob)", "higher"),
    ("preference_accuracy", "preference accuracy (reward)", "higher"),
    ("reward_margin", "reward margin", "higher"),
)
PERCENT = ("rouge_l", "exact_match", "preference_accuracy", "chosen_logp_accuracy")


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key in PERCENT:
        return f"{100 * v:.1f}%"
    return f"{v:.4f}" if v < 100 else f"{v:.1f}"


def _change(base: Any, trained: Any, key: str) -> str:
    if base is None or trained is None:
        return "-"
    if key in PERCENT:
        return f"{100 * (trained - base):+.1f} pts"
    if base == 0:
        return "-"
    return f"{100 * (trained - base) / base:+.1f}%"


def eval_header(results: dict[str, Any]) -> tuple[str, ...]:
    """The columns of eval_table: with alignment (an "sft" entry) base / SFT / aligned, the change from SFT."""
    if "sft" in results:
        return ("metric", "base model", "SFT", "aligned", "aligned vs SFT")
    return ("metric", "base model", "fine-tuned", "change")


def eval_table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows under eval_header(results) from eval/results.json."""
    base, trained = results.get("base") or {}, results.get("trained") or {}
    sft = results.get("sft")
    before = base if sft is None else sft  # what "change" is measured from
    out: list[tuple[str, ...]] = []
    for key, label, _ in ROWS:
        if key in base or key in trained or (sft and key in sft):
            middle = () if sft is None else (_fmt(sft.get(key), key),)
            out.append(
                (
                    label,
                    _fmt(base.get(key), key),
                    *middle,
                    _fmt(trained.get(key), key),
                    _change(before.get(key), trained.get(key), key),
                )
            )
    return out


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)

    def fmt(r: Sequence[str]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))

    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def loss_curve_png(
    steps: Sequence[dict[str, Any]], path: str, title: str, eval_points: dict[str, float] | None = None
) -> bool:
    """Training loss per step (and base/trained eval loss as horizontal lines); False if nothing to plot."""
    pts = sorted({int(s["step"]): float(s["loss"]) for s in steps if s.get("loss") is not None}.items())
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label="train loss", color="tab:blue")
    for (label, y), color in zip((eval_points or {}).items(), ("tab:red", "tab:green"), strict=False):
        ax.axhline(y, linestyle="--", color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _code(text: str | None, limit: int = 200) -> str:
    """A one-line Markdown code span (newlines shown as \\n)."""
    t = json.dumps((text or "").strip()[:limit], ensure_ascii=False)[1:-1].replace('\\"', '"')
    return f"`` {t} ``" if "`" in t else f"`{t}`"


def markdown_report(
    name: str,
    spec_path: str,
    phases: dict[str, float],
    results: dict[str, Any] | None,
    train_summary: dict[str, Any] | None,
    merge_check: dict[str, Any] | None,
    samples: Sequence[dict[str, Any]],
    artifacts_root: str,
    has_png: bool,
) -> str:
    lines = [f"# SFTJob `{name}`", "", f"Spec: `{spec_path}`  ", f"Artifacts: `{artifacts_root}`", ""]
    lines += [
        "## Phases",
        "",
        markdown_table(("phase", "seconds"), [(k, f"{v:.0f}") for k, v in phases.items()]),
        "",
    ]
    if train_summary:
        lines += [
            "## Training",
            "",
            f"{train_summary.get('steps')} optimizer steps, "
            f"{train_summary.get('tokens')} tokens, final train loss {train_summary.get('final_loss'):.4f}.",
            "",
        ]
    if has_png:
        lines += ["![loss curve](loss_curve.png)", ""]
    if results:
        lines += [
            "## Evaluation (held-out data)",
            "",
            markdown_table(eval_header(results), eval_table(results)),
            "",
        ]
        if results.get("failed_gates"):
            lines += ["**Eval gates failed:** " + "; ".join(results["failed_gates"]), ""]
        elif results.get("gates"):
            lines += ["Eval gates passed: " + json.dumps(results["gates"]), ""]
    if merge_check:
        lines += [
            "## Merge",
            "",
            f"dtype {merge_check.get('dtype')}; merged vs base+adapter logits (float32): "
            f"max |diff| {merge_check.get('max_abs_diff'):.2e}; saved copy: "
            f"{json.dumps(merge_check.get('saved'))}; passed: {merge_check.get('passed')}.",
            "",
        ]
    if samples:
        lines += ["## Sample generations", ""]
        for s in samples[:5]:
            lines += [
                f"- reference: {_code(s.get('reference'))}",
                f"  - base: {_code(s.get('base'))}",
                f"  - fine-tuned: {_code(s.get('trained'))}",
            ]
        lines.append("")
    return "\n".join(lines)


def tracking_line(run: dict[str, Any] | None, tracking_uri: str) -> str:
    """The summary's line about spec.tracking.mlflow: the run id, or that no stage reached the server."""
    if not run or not run.get("mlflowRunId"):
        return (
            f"MLflow: no run recorded at {tracking_uri} (tracking failed; see the warnings in the stage logs)"
        )
    uri = str(run.get("mlflowTrackingUri") or tracking_uri).rstrip("/")
    exp, rid = run.get("mlflowExperimentId"), run["mlflowRunId"]
    return f"MLflow run: {rid} (experiment {exp}; {uri}/#/experiments/{exp}/runs/{rid})"


def data_lines(rep: dict[str, Any] | None) -> list[str]:
    """What curation did, from train/data_report.json: a table per source and one line per curation step."""
    if not rep:
        return []
    out = [
        f"data: {rep.get('kept_rows')}/{rep.get('total_rows')} rows kept, {rep.get('train_examples')} training"
        f" samples ({(rep.get('tokens') or {}).get('train')} tokens), {rep.get('eval_examples')} held-out;"
        f" content hash {str(rep.get('content_hash', ''))[:19]}"
    ]
    rows = []
    for name, s in (rep.get("sources") or {}).items():
        dropped = " ".join(f"{k}={v}" for k, v in sorted((s.get("dropped") or {}).items())) or "-"
        target = (
            f"{100 * s['weight']:.0f}%"
            if s.get("weight")
            else (str(s["samples"]) if s.get("samples") else "all")
        )
        rows.append(
            (
                name,
                str(s.get("rows_in")),
                dropped,
                str(s.get("curated_rows")),
                str(s.get("mixed_rows")),
                f"{100 * s.get('fraction', 0):.1f}%",
                target,
            )
        )
    if rows:
        out.append(
            render_table(("source", "rows in", "dropped", "curated", "mixed", "share", "target"), rows)
        )
    nd, ct, pp = rep.get("near_duplicates"), rep.get("contamination"), rep.get("perplexity")
    if nd:
        out.append(
            f"near-duplicates (Jaccard >= {nd['threshold']}): {nd['clusters']} clusters,"
            f" {nd['rows_removed']} rows removed"
        )
    if ct:
        ex = "; ".join(
            f"{h['train']} contains eval {h['part']} {h['eval']}" for h in ct.get("examples", [])[:2]
        )
        out.append(
            f"decontamination: {ct['eval_rows_leaked']}/{ct['eval_rows_checked']} eval rows leaked,"
            f" {ct['train_rows_removed']} training rows removed" + (f" (e.g. {ex})" if ex else "")
        )
    if pp and "threshold" in pp:
        out.append(
            f"perplexity filter: {pp['dropped']}/{pp['scored']} rows above {pp['threshold']:.1f} removed"
            f" (median {pp['median']:.1f})"
        )
    return out
