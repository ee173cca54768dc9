"""The stage table (sftjob_api/stage_table.py) as its readers see it: the operator's renderers and phase
machine, `sftjob run`'s command lines and the CLI. Pure: no cluster, no trainer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sftjob_api import STAGE_TABLE, Phase, Reason, SFTJobStatus, Stage, parse_spec
from sftjob_api.exit_codes import ExitCode
from sftjob_api.stage_table import TRAINER_MODULE, Launch, stage_of_failure, trainer_argv
from sftjob_operator.cluster_cli import default_stage
from sftjob_operator.render import phase as ph
from sftjob_operator.render.names import COMPLETION_INDEX_LABEL
from sftjob_operator.render.objects import RenderOptions, SFTJobRef, render_stage_job
from sftjob_operator.render.observation import children_of, observe, render_status
from sftjob_operator.render.trainer_config import CONFIG_PATH

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SPEC = {
    "model": {"uri": "s3://models/base"},
    "dataset": {"train": ["s3://data/train.jsonl"]},
    "output": {"uri": "s3://out/sft"},
    "resources": {"nodes": 2, "gpusPerNode": 1},
    "training": {"globalBatchSize": 16, "microBatchSize": 4},
}
REF = SFTJobRef(name="run", namespace="team-a", uid="sftjob-uid")
CHANGED = "checkpoint of this run was written under another spec: spec.training.learningRate: 0.003 -> 0.001"


def failed_group(exit_code: int, message: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The real train Job as the Job controller leaves it after rank 0 exited `exit_code` (a FailJob rule),
    and that rank's pod with its termination message."""
    job = render_stage_job(Stage.TRAIN, REF, parse_spec(SPEC), RenderOptions())
    job["metadata"]["uid"] = "job-uid"
    rule = f"Container trainer for pod team-a/run-train-0-x failed with exit code {exit_code} matching FailJob rule"
    job["status"] = {
        "failed": 1,
        "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": rule}],
    }
    tmeta = job["spec"]["template"]["metadata"]
    pod = {
        "metadata": {
            "name": "run-train-0-x",
            "labels": {**tmeta["labels"], COMPLETION_INDEX_LABEL: "0"},
            "ownerReferences": [{"uid": "job-uid", "kind": "Job", "name": job["metadata"]["name"]}],
            "creationTimestamp": "2026-01-01T11:00:00Z",
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "message": message}}}
            ],
        },
    }
    return job, pod


def end_of(job: dict[str, Any], pod: dict[str, Any]) -> SFTJobStatus:
    """What the operator writes for these children: observe -> decide -> status, as a reconcile does."""
    kids = children_of(REF.uid, [job], [pod])
    prev = SFTJobStatus(phase=Phase.TRAINING)
    obs = observe(prev, parse_spec(SPEC), None, None, False, kids.jobs, kids.pods, None, None, {}, NOW)
    meta = {"name": REF.name, "namespace": REF.namespace, "creationTimestamp": "2026-01-01T10:00:00Z"}
    return render_status(meta, obs, ph.next_phase(obs.phase), NOW, 1)


def test_exit_code_spec_changed_ends_failed_spec_changed_saying_what_to_do() -> None:
    st = end_of(*failed_group(int(ExitCode.SPEC_CHANGED), CHANGED))
    assert (st.phase, st.reason) == (Phase.FAILED, "SpecChanged")
    assert CHANGED in st.message  # the trainer's words: which field changed
    assert "Re-create the SFTJob" in st.message and "spec.training.resumeFrom" in st.message
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "SpecChanged")
    # any other permanent error stays TrainingFailed, quoting the Job's failure
    other = end_of(*failed_group(int(ExitCode.PERMANENT), "bad data: train.jsonl:3"))
    assert (other.reason, other.message.startswith("trainer exited with a permanent error")) == (
        "TrainingFailed",
        True,
    )


def test_each_stage_is_its_trainer_entry_point_and_a_group_runs_under_launch() -> None:
    for stage, row in STAGE_TABLE.items():
        job = render_stage_job(stage, REF, parse_spec(SPEC), RenderOptions())
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["command"][: len(TRAINER_MODULE)] == list(TRAINER_MODULE)
        assert container["command"][-3:] == [str(stage), "--config", CONFIG_PATH]
        assert (container["command"][len(TRAINER_MODULE)] == "launch") == row.group
        assert job["spec"]["completionMode"] == ("Indexed" if row.group else "NonIndexed")
    local = trainer_argv(Stage.TRAIN, "/w/config.json", Launch(1, 2, "127.0.0.1", "29511"))
    assert local == [
        "launch",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        "--master-port=29511",
        "train",
        "--config",
        "/w/config.json",
    ]
    with pytest.raises(ValueError, match="launch is required"):
        trainer_argv(Stage.TRAIN, "c")
    with pytest.raises(ValueError, match="not expected"):
        trainer_argv(Stage.EVAL, "c", Launch(1, 1, "a", "p"))


def test_every_failed_reason_names_one_stage_and_the_cli_reads_its_logs() -> None:
    owners: dict[Reason, Stage] = {}
    for stage, row in STAGE_TABLE.items():
        for reason in row.failed_reasons:
            assert reason not in owners, (reason, owners.get(reason), stage)
            owners[reason] = stage
    assert stage_of_failure("SpecChanged") == Stage.TRAIN and stage_of_failure("InvalidSpec") is None
    assert default_stage({"phase": "Failed", "reason": "CurationFailed"}) == "curate"
    assert default_stage({"phase": "Failed", "reason": "EvalGateFailed"}) == "eval"
    assert default_stage({"phase": "Curating", "reason": "CurateRunning"}) == "curate"
    assert default_stage({"phase": "Suspended", "children": {"trainJob": "t", "evalJob": "e"}}) == "eval"
    assert default_stage({"phase": "Pending"}) == "train"
    assert default_stage({"phase": "Aligning"}) == "align"
    # the run-wide ends of a group (restarts used up, deadline) name the latest group stage with a Job
    both = {"trainJob": "t", "alignJob": "a"}
    assert default_stage({"phase": "Failed", "reason": "BackoffLimitExceeded", "children": both}) == "align"
    assert (
        default_stage({"phase": "Failed", "reason": "DeadlineExceeded", "children": {"trainJob": "t"}})
        == "train"
    )


def test_the_run_succeeds_naming_the_stages_that_ran() -> None:
    assert ph.succeeded_message((Stage.TRAIN,)) == "training completed"
    assert ph.succeeded_message((Stage.TRAIN, Stage.EVAL)) == "training and evaluation completed"
    assert ph.succeeded_message(tuple(STAGE_TABLE)) == (
        "curation, training, alignment, evaluation and merge completed"
    )
