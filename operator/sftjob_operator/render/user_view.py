"""What a user watching a run sees at once (pure): a rank the scheduler cannot place, as a condition carrying
the scheduler's own message, and `kubectl get sft` columns that never show a number nobody measured.

- `Unschedulable` (condition): True as soon as a live pod of the SFTJob has PodScheduled=False/Unschedulable
  (e.g. `0/1 nodes are available: 1 Insufficient cpu`), naming the stage, rank and pod; False once none has.
  Absent on a run that never had such a pod. `Stuck` and runPolicy.failWhenStuckSeconds still act after
  stuckPendingTimeoutSeconds (render/stuck.py): this condition only says it early.
- Progress: a trainer's gauges read 0 until its first optimizer step (loss 0, ETA 0s) and, after a resume,
  hold the checkpoint's step with no loss or ETA of this process yet; `unmeasured_blanked` drops what the
  trainer has not measured. While the group restarts (reason Restarting) the columns say `Restarting`,
  without the old group's loss and ETA.
"""

from __future__ import annotations

from datetime import datetime

from sftjob_api import STAGE_TABLE, Condition, Reason, Stage
from sftjob_api.status import Progress

from .conditions import get_condition, set_condition
from .observe import PodObs

UNSCHEDULABLE = "Unschedulable"
RESTARTING = "Restarting"
MAX_NAMED_PODS = 3  # the condition names this many pods; the rest are counted


def unschedulable_pods(pods: list[PodObs]) -> list[PodObs]:
    """Live pods the scheduler has marked Unschedulable, in stage then rank order."""
    order: dict[str, int] = {s.value: i for i, s in enumerate(Stage)}
    waiting = [
        p for p in pods if p.unschedulable_message is not None and p.phase == "Pending" and not p.deleting
    ]
    return sorted(waiting, key=lambda p: (order.get(p.stage, len(order)), p.index or 0, p.name))


def _described(pod: PodObs) -> str:
    group = pod.stage in STAGE_TABLE and STAGE_TABLE[Stage(pod.stage)].group
    rank = f" rank {pod.index}" if group and pod.index is not None else ""
    return f"{pod.stage or 'pod'}{rank} (pod {pod.name}): {pod.unschedulable_message}"


def unschedulable_message(pods: list[PodObs]) -> str:
    named = "; ".join(_described(p) for p in pods[:MAX_NAMED_PODS])
    more = len(pods) - MAX_NAMED_PODS
    return f"cannot be scheduled: {named}" + (f"; and {more} more pod(s)" if more > 0 else "")


def unschedulable_condition(
    conds: list[Condition], pods: list[PodObs], now: datetime, generation: int | None
) -> list[Condition]:
    """conds with `Unschedulable` set from the pods seen now (see the module's docstring)."""
    waiting = unschedulable_pods(pods)
    if waiting:
        return set_condition(
            conds, "Unschedulable", "True", UNSCHEDULABLE, unschedulable_message(waiting), now, generation
        )
    old = get_condition(conds, "Unschedulable")
    if old is not None and old.status == "True":
        return set_condition(
            conds, "Unschedulable", "False", "Scheduled", f"every pod was scheduled; was: {old.message}", now,
            generation,
        )  # fmt: skip
    return conds


def unmeasured_blanked(progress: Progress, resumed_from_step: int) -> Progress:
    """A progress page's reading without what the trainer has not measured yet: before this process's first
    step (its step is still the one it started from: 0, or the resumed checkpoint's) its loss, ETA and
    throughput gauges hold 0, not a measurement. Before any step at all, no progress is shown either."""
    step = progress.step or 0
    if step > resumed_from_step:
        return progress
    blank = {"loss": None, "eta": None, "tokens_per_second": None}
    if step == 0:
        blank |= {"summary": None, "percent": None}
    return progress.model_copy(update=blank)


def shown_progress(progress: Progress | None, reason: str) -> Progress | None:
    """status.progress as the reconcile writes it: while a group of ranks restarts, `Restarting` in the
    PROGRESS column and no LOSS/ETA (they were the old group's); step and totals stay (recovery bookkeeping
    reads the step)."""
    if progress is None or reason != Reason.RESTARTING:
        return progress
    return progress.model_copy(
        update={"summary": RESTARTING, "loss": None, "eta": None, "tokens_per_second": None}
    )
