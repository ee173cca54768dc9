"""The align stage (spec.alignment) on the real control plane, KWOK pods standing in for the trainer: the
operator runs it as a second group stage between training and evaluation (phase Aligning, its own indexed
Job and rendezvous Service), a failing align rank ends the run Failed/AlignmentFailed in its own words, and
held-out preference metrics below spec.eval.gates end it Failed/EvalGateFailed without a merge Job.
The pure side (restarts, suspend, progress) is tests/operator/test_align_phase.py."""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import pytest
import test_curate_e2e as curate_e2e
from conftest import Operator, apply, condition, jobs, pods, sftjob, status, wait_phase
from testbed.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ALIGNMENT = {"dataset": {"train": ["s3://datasets/prefs.jsonl"]}, "beta": 0.1}
WHY = "prefs.jsonl:3: chosen equals rejected (the only pair of the file)"
# What a real eval stage of an aligned run reports (its JSON termination message; KWOK sets it from an
# annotation): the SFT metrics and the held-out preference metrics, both below the preference gates.
PREFERENCE_GATES = {"minPreferenceAccuracy": 0.9, "minRewardMargin": 0.5}
MEASURED = {"evalLoss": 0.9, "preferenceAccuracy": 0.55, "rewardMargin": 0.125}


def transitions(text: str, before: str, after: str) -> float:
    line = f'sftjob_operator_phase_transitions_total{{from_phase="{before}",to_phase="{after}"}} '
    found = [ln for ln in text.splitlines() if ln.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_align_runs_as_a_group_between_training_and_eval_and_a_failed_rank_fails_it(
    sftjob_crd: Any, namespace: str, operator: Operator
) -> None:
    kube, ns = sftjob_crd, namespace
    two_nodes = {"nodes": 2, "gpusPerNode": 1, "podAnnotations": {"kwok.sftjob.dev/delay": "2s"}}
    slow = {"gpusPerNode": 1, "podAnnotations": {"kwok.sftjob.dev/delay": "5s"}}
    reports = {
        "kwok.sftjob.dev/delay": "1s",
        "kwok.sftjob.dev/message": json.dumps({"evalResults": MEASURED}),
    }
    with curate_e2e.job_history(kube, ns) as seen:
        apply(
            kube,
            ns,
            sftjob("dpo", resources=two_nodes, alignment=ALIGNMENT),
            sftjob("dpofail", resources=slow, alignment=ALIGNMENT),
            sftjob(
                "dpogate",
                resources={"gpusPerNode": 1, "podAnnotations": reports},
                alignment=ALIGNMENT,
                eval={"gates": PREFERENCE_GATES},
            ),
        )
        # The second run's align rank fails with a permanent error: KWOK ends it with exit code 2 and the
        # trainer's reason as its termination message, as the real align stage does on bad preference data.
        rank0 = wait_until(
            lambda: next(
                (p for p in pods(kube, ns, "sft.tuning.dev/job-name=dpofail,sft.tuning.dev/stage=align")
                 if p["status"].get("phase") == "Running"),
                None,
            ),
            90,
            "dpofail's align pod running",
        )  # fmt: skip
        kube.kubectl(
            "annotate", "pod", rank0["metadata"]["name"], "-n", ns, "--overwrite",
            "kwok.sftjob.dev/exit-code=2", f"kwok.sftjob.dev/message={WHY}", "kwok.sftjob.dev/delay=0s",
        )  # fmt: skip
        st = wait_phase(kube, ns, "dpo", ("Succeeded", "Failed"), 150, operator)
        failed = wait_phase(kube, ns, "dpofail", ("Succeeded", "Failed"), 60, operator)
        gated = wait_phase(kube, ns, "dpogate", ("Succeeded", "Failed"), 60, operator)
        history = list(seen)

    # The run: training, then alignment, then evaluation and merge.
    assert st["phase"] == "Succeeded", st
    assert st["message"] == "training, alignment, evaluation and merge completed"
    assert (
        condition(st, "Aligned")["status"] == "True"
        and condition(st, "Aligned")["reason"] == "AlignmentCompleted"
    )
    assert condition(st, "Training")["reason"] == "TrainingCompleted"
    assert st["children"]["alignJob"] == "dpo-align" and st["restarts"] == 0
    # Each stage's Job was created only once the one before it had completed (the watch's order of writes).
    order = ["dpo-train", "dpo-align", "dpo-eval", "dpo-merge"]
    first = {name: next(i for i, (_, n, _) in enumerate(history) if n == name) for name in order}
    assert sorted(order, key=first.__getitem__) == order, history
    for before, after in pairwise(order):
        assert any(n == before and done for _, n, done in history[: first[after]]), (before, after, history)
    text = operator.metrics()
    assert transitions(text, "Training", "Aligning") == 3.0, text  # every run
    assert transitions(text, "Aligning", "Evaluating") == 2.0  # dpo's and dpogate's
    assert transitions(text, "Training", "Evaluating") == 0.0

    # The align group: launched like training (indexed, one pod per node, backoffLimit 0 so the operator
    # restarts the whole group, the FailJob rule for permanent codes), meeting at its own rank 0.
    align = kube.get_json("job", "dpo-align", "-n", ns)
    spec = align["spec"]
    assert (spec["completionMode"], spec["completions"], spec["backoffLimit"]) == ("Indexed", 2, 0)
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    assert spec["template"]["spec"]["containers"][0]["command"][-3:-2] == ["align"]
    ranks = pods(kube, ns, "sft.tuning.dev/job-name=dpo,sft.tuning.dev/stage=align")
    assert sorted(p["spec"]["hostname"] for p in ranks) == ["dpo-align-0", "dpo-align-1"]
    for p in ranks:
        env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
        assert (env["MASTER_ADDR"], p["spec"]["subdomain"]) == ("dpo-align-0.dpo-align", "dpo-align")
    svc = kube.get_json("service", "dpo-align", "-n", ns)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"]["sft.tuning.dev/stage"] == "align"

    # The failing run: Failed/AlignmentFailed quoting the rank, no restart (a permanent code), no eval.
    assert (failed["phase"], failed["reason"]) == ("Failed", "AlignmentFailed"), failed
    assert WHY in failed["message"] and "exit code 2" in failed["message"], failed["message"]
    assert condition(failed, "Aligned")["reason"] == "AlignmentFailed" and failed["restarts"] == 0
    names = sorted(
        j["metadata"]["name"] for j in jobs(kube, ns) if j["metadata"]["name"].startswith("dpofail")
    )
    assert names == ["dpofail-align", "dpofail-train"]
    assert status(kube, ns, "dpofail")["phase"] == "Failed"

    # The gated run: the eval pod's preference metrics fail both gates; the run ends Failed/EvalGateFailed
    # naming each gate with the measured value, and no merge Job was ever created.
    assert (gated["phase"], gated["reason"]) == ("Failed", "EvalGateFailed"), gated
    assert "minPreferenceAccuracy: 0.55 < 0.9" in gated["message"], gated["message"]
    assert "minRewardMargin: 0.125 < 0.5" in gated["message"], gated["message"]
    results = gated["evalResults"]
    assert (results["preferenceAccuracy"], results["rewardMargin"], results["gatesPassed"]) == (
        0.55,
        0.125,
        False,
    )
    assert condition(gated, "Evaluated")["status"] == "False"
    assert condition(gated, "Aligned")["reason"] == "AlignmentCompleted"
    made = {n for _, n, _ in history if n.startswith("dpogate-")}
    assert made == {"dpogate-train", "dpogate-align", "dpogate-eval"}, history
