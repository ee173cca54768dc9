"""One stage of `sftjob run`: the trainer's entry point as a child process, with the arguments its row in
sftjob_api.stage_table gives it (a group stage under torchrun with nodes x max(gpusPerNode, 1) local ranks
on 127.0.0.1), and what the terminal shows of it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sftjob_api import STAGE_TABLE, Layout, Phase, Reason, Stage
from sftjob_api.exit_codes import ExitCode
from sftjob_api.ports import free_port
from sftjob_api.stage_table import TRAINER_MODULE, Launch, trainer_argv
from sftjob_api.storage import Store
from sftjob_api.trainer_config import RUN_ID_ENV, TrainerConfig

from .interrupt import Interrupt
from .process import ChildProcess, Progress
from .summary import print_summary


@dataclass
class Run:
    """One `sftjob run`: its config, store, work directory and what each stage took."""

    cfg: TrainerConfig
    cfg_path: str
    store: Store
    work: str
    env: dict[str, str]  # the trainer's; carries the run id (RUN_ID_ENV)
    echo: Callable[[str], None]
    intr: Interrupt
    timings: dict[str, float] = field(default_factory=dict)
    current: Phase = Phase.PENDING  # the last phase printed
    running: Stage | None = None  # the stage whose child process is (or was last) running

    def phase(self, p: Phase, msg: str = "") -> None:
        self.current = p
        self.echo(f"[{time.strftime('%H:%M:%S')}] phase {p}" + (f": {msg}" if msg else ""))

    def child(self, stage: Stage, argv: list[str], on_event: Callable[[dict[str, Any]], Any]) -> int:
        """Run the trainer with `argv` (after `python -m sftjob_trainer`) as `stage`'s child process."""
        row = STAGE_TABLE[stage]
        proc = ChildProcess(
            stage,
            [sys.executable, *TRAINER_MODULE[1:], *argv],
            self.env,
            os.path.join(self.work, f"{stage}.log"),
        )
        t0 = time.monotonic()
        self.running = stage
        rc = proc.run(on_event, self.intr)
        self.timings[row.phase] = time.monotonic() - t0
        if rc not in (0, ExitCode.EVAL_GATE_FAILED) and self.intr.signum is None:
            self.phase(Phase.FAILED, f"{row.failure_reason(rc)} (exit code {rc}): {proc.failure()}")
        return rc

    def done(self, stage: Stage) -> str | None:
        """What shows that `stage` completed in an earlier attempt, so that a resume skips it (None: not
        done). Each key is the last one its stage writes; merge, the final stage, completes the run."""
        store = self.store
        if store.exists(Layout.MANIFEST):
            return Layout.MANIFEST  # the whole run
        if stage == Stage.CURATE and store.exists(Layout.DATA_REPORT):
            return Layout.DATA_REPORT
        weights = Layout.weights(self.cfg.method.type)
        if stage == Stage.TRAIN and store.exists(Layout.TRAIN_SUMMARY) and store.list(weights):
            return Layout.TRAIN_SUMMARY
        if stage == Stage.ALIGN and store.exists(Layout.ALIGN_SUMMARY) and store.list(Layout.ALIGNED):
            return Layout.ALIGN_SUMMARY
        if stage == Stage.EVAL and (store.read_json(Layout.EVAL_RESULTS) or {}).get("gates_passed"):
            return Layout.EVAL_RESULTS  # a failed gate is evaluated again (and fails again)
        return None

    def skip(self, stage: Stage) -> bool:
        key = self.done(stage)
        if key:
            self.phase(STAGE_TABLE[stage].phase, f"already done ({key} present): skipped")
        return key is not None

    @property
    def steps_file(self) -> str:
        """The training steps (report/'s loss curve)."""
        return self.stage_steps_file(Stage.TRAIN)

    def stage_steps_file(self, stage: Stage) -> str:
        return os.path.join(self.work, "steps.jsonl" if stage == Stage.TRAIN else f"{stage}-steps.jsonl")


def _print_curate_event(r: Run, ev: dict[str, Any]) -> None:
    if ev.get("event") == "curated":
        r.echo(
            f"  {ev.get('train_examples')} training / {ev.get('eval_examples')} held-out examples, dropped "
            f"{ev.get('dropped') or 'nothing'}, {'reused' if ev.get('reused') else 'curated'} in "
            f"{ev.get('seconds')}s, shards for {ev.get('world_size')} rank(s)"
        )


def _print_eval_event(r: Run, ev: dict[str, Any]) -> None:
    if str(ev.get("event", "")).startswith("eval_"):
        fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items() if k != "ts")
        r.echo("  " + " ".join(fields))


def _print_merge_event(r: Run, ev: dict[str, Any]) -> None:
    if ev.get("event") == "merge_verified":
        r.echo(
            f"  merged vs base+adapter: max |logit diff| {ev['merge_fp32']['max_abs_diff']:.2e} (fp32), "
            f"saved copy rel. error {ev['saved']['rel_l2']:.2e}, top-1 agreement "
            f"{ev['saved']['top1_agreement']:.3f}"
        )


def newest_checkpoint(r: Run, stage: Stage) -> int | None:
    """The newest complete checkpoint of this run's train or align stage (None: none, or another stage)."""
    prefix = Layout.STAGE_CHECKPOINTS.get(stage)
    if prefix is None:
        return None
    return Layout.newest_checkpoint(r.store.list(prefix), r.env[RUN_ID_ENV], prefix)


def _group_intro(stage: Stage) -> Callable[[Run], str]:
    def intro(r: Run) -> str:
        resume = newest_checkpoint(r, stage)
        return f"{r.cfg.world_size()} local rank(s)" + (f", resuming from step {resume}" if resume else "")

    return intro


# What the terminal shows of a stage besides its phase (a stage without an entry: the row's `doing`, and
# none of its events).
_INTRO: dict[Stage, Callable[[Run], str]] = {
    Stage.CURATE: lambda r: "reading, curating and tokenizing the sources once",
    Stage.TRAIN: _group_intro(Stage.TRAIN),
    Stage.ALIGN: _group_intro(Stage.ALIGN),
    Stage.EVAL: lambda r: "base model and fine-tuned model on the held-out data",
    Stage.MERGE: lambda r: f"adapter into the full-precision base, saved as {r.cfg.merge.dtype}",
}
_PRINT: dict[Stage, Callable[[Run, dict[str, Any]], None]] = {
    Stage.CURATE: _print_curate_event,
    Stage.EVAL: _print_eval_event,
    Stage.MERGE: _print_merge_event,
}


def run_stage(r: Run, stage: Stage) -> int:
    """Run `stage` as its Job would, on this machine; its exit code. A group stage's `step` events feed the
    progress bar (and report/'s loss curve)."""
    row = STAGE_TABLE[stage]
    launch = None
    if row.group:
        port = str(free_port())
        launch = Launch(
            nnodes=1, nproc_per_node=r.cfg.world_size(), master_addr="127.0.0.1", master_port=port
        )
    intro = _INTRO.get(stage)
    r.phase(row.phase, intro(r) if intro else row.doing)
    argv = trainer_argv(stage, r.cfg_path, launch)
    if row.group:
        prog = Progress(r.stage_steps_file(stage))
        rc = r.child(stage, argv, prog)
        prog.close()
        return rc
    show = _PRINT.get(stage)
    rc = r.child(stage, argv, (lambda ev: show(r, ev)) if show else (lambda ev: None))
    if rc and row.failure_reason(rc) == Reason.GATE_FAILED and r.intr.signum is None:
        res = r.store.read_json(Layout.EVAL_RESULTS) or {}
        r.phase(
            Phase.FAILED,
            f"{Reason.GATE_FAILED}: " + "; ".join(res.get("failed_gates", [])) + " (adapter kept)",
        )
        print_summary(r)
    return rc
