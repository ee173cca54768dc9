"""What eval-set leaks do to the eval numbers, and what decontamination changes (not a test).

Runs examples/sftjob-curated-mixture.yaml with `sftjob run` twice — as shipped (decontamination on) and with
`dataset.curation.decontamination` (and its gate) removed, so the 9 planted eval leaks are trained on — both
longer than the example (--steps, so every training row is seen several times) and generating for every
eval row. Then it splits the eval rows into the leaked ones (their input appears in a training source) and
the clean ones, and prints exact match on each group for the base and the fine-tuned model: leaks trained on
inflate the leaked group; with decontamination both groups measure the same thing.

    python benchmarks/decontamination_effect.py [--steps 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "sftjob-curated-mixture.yaml"
DATA = REPO / "examples" / "data"


def spec_variant(decontaminate: bool, steps: int) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    for s in spec["dataset"]["sources"]:
        s["files"] = [str((EXAMPLE.parent / f).resolve()) for f in s["files"]]
    spec["dataset"]["eval"] = [str((EXAMPLE.parent / f).resolve()) for f in spec["dataset"]["eval"]]
    if not decontaminate:
        spec["dataset"]["curation"].pop("decontamination")
        spec["dataset"]["curation"].pop("maxContamination")
    spec["training"]["maxSteps"] = steps
    spec["training"]["checkpointSteps"] = steps
    spec["eval"]["maxSamples"] = 1000  # every eval row
    doc["metadata"]["name"] = "decontam-on" if decontaminate else "decontam-off"
    return doc


def leaked_inputs() -> set[str]:
    """Eval inputs that appear, verbatim or wrapped, in some training source."""
    evals = [json.loads(x)["input"] for x in (DATA / "contacts-eval.jsonl").read_text().splitlines()]
    train = [
        json.loads(x)["input"]
        for f in sorted(DATA.glob("mixture-*.jsonl"))
        for x in f.read_text().splitlines()
        if x.strip()
    ]
    return {e for e in evals if any(e in t for t in train)}


def run(decontaminate: bool, steps: int, tmp: Path) -> dict[str, Any]:
    from sftjob_trainer.eval_metrics import exact_match

    doc = spec_variant(decontaminate, steps)
    name = doc["metadata"]["name"]
    spec_file = tmp / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    out = tmp / f"out-{name}"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "sftjob_operator.cli", "run", str(spec_file), "--output", str(out)]
    cmd += ["--work-dir", str(tmp / f"work-{name}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    root = out / "local" / name
    results = json.loads((root / "eval" / "results.json").read_text())
    report = json.loads((root / "train" / "data_report.json").read_text())
    samples = [json.loads(x) for x in (root / "eval" / "samples.jsonl").read_text().splitlines()]
    leaks = leaked_inputs()
    groups: dict[str, dict[str, list[float]]] = {"leaked": {"base": [], "trained": []}}
    groups["clean"] = {"base": [], "trained": []}
    for s in samples:
        g = "leaked" if any(x in s["prompt"] for x in leaks) else "clean"
        for model in ("base", "trained"):
            groups[g][model].append(exact_match(s[model] or "", s["reference"]))
    row: dict[str, Any] = {
        "decontamination": decontaminate,
        "steps": steps,
        "rows_kept": f"{report['kept_rows']}/{report['total_rows']}",
        "dropped": report["dropped"],
        "eval_loss_base": results["base"].get("eval_loss"),
        "eval_loss_trained": results["trained"].get("eval_loss"),
        "seconds": round(time.monotonic() - t0, 1),
    }
    for g, by_model in groups.items():
        for model, xs in by_model.items():
            row[f"em_{g}_{model}"] = round(sum(xs) / len(xs), 4) if xs else None
        row[f"n_{g}"] = len(by_model["trained"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="decontam-") as d:
        rows = [run(on, a.steps, Path(d)) for on in (True, False)]
    print(
        f"\n`python benchmarks/decontamination_effect.py --steps {a.steps}`, {time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    print(
        "| decontamination | rows kept | dropped | eval loss base → trained "
        "| exact match, leaked eval rows (base → trained) | exact match, clean eval rows (base → trained) | s |"
    )
    print("|---|---|---|---|---|---|---:|")
    for r in rows:
        print(
            f"| {'on' if r['decontamination'] else 'off'} | {r['rows_kept']} | {r['dropped']} "
            f"| {r['eval_loss_base']:.3f} → {r['eval_loss_trained']:.3f} "
            f"| {r['em_leaked_base']:.1%} → {r['em_leaked_trained']:.1%} (n={r['n_leaked']}) "
            f"| {r['em_clean_base']:.1%} → {r['em_clean_trained']:.1%} (n={r['n_clean']}) | {r['seconds']} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
