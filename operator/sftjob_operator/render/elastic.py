"""The training group's size, decided purely (docs/recovery.md, "Elastic runs").

The group runs at `resources.nodes`; with `runPolicy.elastic` at any size from minNodes to maxNodes where the
global batch divides evenly (`SFTJobSpec.group_sizes`). The operator only decides the size and renders the
train Job at it (`spec_at`); the trainer reads its world size from torchrun's environment and resumes the
newest checkpoint at any size.

Three resizes, each a group restart recorded in `status.recoveries` (not counted against backoffLimit):

* **Shrink**: a rank of the running attempt stays unschedulable (a lost node, no replacement) for
  replacementTimeoutSeconds: the group re-forms at the largest allowed size not above the ranks that are
  scheduled (at least minNodes; below that it waits, Stuck as any run).
* **Grow**: while an elastic group runs below its most nodes, a capacity probe (a Job of placeholder pods
  with the trainer pod's resources and placement, `render_probe_job`) asks the scheduler for the missing
  nodes. Once probe pods are scheduled the capacity exists (and the probe holds it); at the next checkpoint
  after that the group re-forms at the size they allow. Grows are bounded by maxResizesPerHour (shrinks
  count towards it too), so a flaky pool cannot make the run flap.
* **Edited size**: `resources.nodes` or `gpusPerNode` changed while the group was not running (suspended,
  not started): the train Job is re-created at the new shape. A running group keeps its size until its next
  (re)start.

The alignment group (spec.alignment) is not elastic: it runs at resources.nodes (`stage_size`).
"""

from __future__ import annotations

from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sftjob_api import SFTJobSpec, SFTJobStatus, Stage
from sftjob_api.status import MAX_RECOVERIES, Recovery

from .names import LABEL_STAGE, PROBE, ChildNames, labels
from .observe import JobObs, PodObs
from .recovery import checkpoint_step_of, recovered

Obj = dict[str, Any]
HOUR = timedelta(hours=1)
RESIZED = "Resized"  # the cause of a resize's recovery starts with it (recovery.cause_kind)


def world(nodes: int, gpus_per_node: int) -> int:
    return nodes * max(gpus_per_node, 1)


def group_size(spec: SFTJobSpec, status: SFTJobStatus) -> int:
    """The nodes the next train Job is rendered at: resources.nodes, or an elastic run's current size
    (status.nodes) while it is one the spec allows."""
    if spec.run_policy.elastic is not None and status.nodes in spec.group_sizes():
        return int(status.nodes or spec.resources.nodes)
    return spec.resources.nodes


def stage_size(spec: SFTJobSpec, status: SFTJobStatus, stage: Stage) -> int:
    """The nodes a group stage's Job is rendered at: the training group's size (`group_size`); the alignment
    group always runs at resources.nodes (its batch is checked against that size only: not elastic)."""
    return group_size(spec, status) if stage == Stage.TRAIN else spec.resources.nodes


def spec_at(spec: SFTJobSpec, nodes: int) -> SFTJobSpec:
    """The spec as the group at `nodes` runs it (the trainer's config and torchrun's --nnodes)."""
    if nodes == spec.resources.nodes:
        return spec
    return spec.model_copy(update={"resources": spec.resources.model_copy(update={"nodes": nodes})})


def max_group_nodes(spec: SFTJobSpec) -> int:
    return max(spec.group_sizes(), default=spec.resources.nodes)


def resizes_within_hour(status: SFTJobStatus, now: datetime) -> int:
    return sum(1 for r in status.recoveries if r.to_world_size is not None and now - r.time < HOUR)


@dataclass(frozen=True)
class Resize:
    nodes: int  # the size the group re-forms at
    cause: str
    held: bool = False  # a grow that is due but waits: maxResizesPerHour is used up


def _largest(sizes: Iterable[int], at_most: int) -> int | None:
    return max((s for s in sizes if s <= at_most), default=None)


def _live(pods: Iterable[PodObs]) -> list[PodObs]:
    return [p for p in pods if p.phase in ("Pending", "Running") and not p.deleting]


def plan_resize(
    spec: SFTJobSpec,
    status: SFTJobStatus,
    train: JobObs | None,
    train_pods: list[PodObs],
    probe_pods: list[PodObs],
    capacity_since_step: int | None,
    now: datetime,
) -> Resize | None:
    """The resize to make now, if any (see the module docstring). `capacity_since_step`: the newest
    checkpoint step when probe pods were first seen scheduled (None: no spare capacity seen)."""
    if train is None or train.finished or train.deleting or train.nodes is None:
        return None
    gpus = spec.resources.gpus_per_node
    live = _live(train_pods)
    running = [p for p in live if p.phase == "Running"]
    wanted = group_size(spec, status)
    kueue_sized = train.min_parallelism is not None and not train.suspended  # render/admission.py
    if (
        (train.nodes, train.gpus_per_node) != (wanted, gpus)
        and (train.suspended or not running)
        and not kueue_sized
    ):
        what = "resources.gpusPerNode" if train.gpus_per_node != gpus else "resources.nodes"
        return Resize(wanted, f"{what} changed while the group was not running")
    elastic = spec.run_policy.elastic
    if elastic is None or train.suspended:
        return None
    sizes = spec.group_sizes()
    stranded = [p for p in live if not p.scheduled and p.unschedulable_message and p.created is not None]
    waited = [p for p in stranded if (now - p.created).total_seconds() >= elastic.replacement_timeout_seconds]  # type: ignore[operator]
    if waited:
        scheduled = sum(1 for p in live if p.scheduled)
        smaller = _largest(sizes, min(scheduled, train.nodes - 1))
        if smaller is None:
            return None  # fewer than minNodes can run: wait (Stuck), as a fixed-size run does
        first = min(waited, key=lambda p: p.index if p.index is not None else 0)
        age = (now - first.created).total_seconds()  # type: ignore[operator]
        return Resize(
            smaller,
            f"{len(waited)} of {train.nodes} rank(s) unschedulable for {age:.0f}s"
            f" (runPolicy.elastic.replacementTimeoutSeconds {elastic.replacement_timeout_seconds}):"
            f" {first.unschedulable_message}",
        )
    if len(running) < train.nodes or capacity_since_step is None:
        return None
    spare = sum(1 for p in _live(probe_pods) if p.scheduled)
    bigger = _largest(sizes, train.nodes + spare)
    if bigger is None or bigger <= train.nodes:
        return None
    step = checkpoint_step_of(status.artifacts.latest_checkpoint if status.artifacts else None)
    if step <= capacity_since_step:
        return None  # grow at the next checkpoint, not before
    used = resizes_within_hour(status, now)
    if used >= elastic.max_resizes_per_hour:
        return Resize(
            bigger,
            f"capacity for {spare} more node(s) found; the group stays at {train.nodes} node(s): {used} resizes"
            f" in the last hour, runPolicy.elastic.maxResizesPerHour is {elastic.max_resizes_per_hour}",
            held=True,
        )
    return Resize(
        bigger, f"capacity for {spare} more node(s) found; re-formed after the checkpoint of step {step}"
    )


def record_resize(
    prev: SFTJobStatus, resize: Resize, train: JobObs, gpus: int, now: datetime
) -> SFTJobStatus:
    """prev + the resize's recovery (not counted) and the new size."""
    resumed = checkpoint_step_of(prev.artifacts.latest_checkpoint if prev.artifacts else None)
    failed_step = prev.progress.step if prev.progress else None
    before = world(
        train.nodes or resize.nodes, train.gpus_per_node if train.gpus_per_node is not None else gpus
    )
    after = world(resize.nodes, gpus)
    entry = Recovery(
        time=now,
        cause=f"{RESIZED}: {train.nodes} -> {resize.nodes} node(s) (world size {before} -> {after}): {resize.cause}"[
            :1024
        ],
        counted=False,
        failed_step=failed_step,
        resumed_from_step=resumed,
        steps_lost=max(failed_step - resumed, 0) if failed_step is not None else None,
        train_job_uid=train.uid,
        from_world_size=before,
        to_world_size=after,
    )
    return prev.model_copy(
        update={
            "recoveries": [*prev.recoveries, entry][-MAX_RECOVERIES:],
            "nodes": resize.nodes,
            "world_size": after,
        }
    )


def capacity_mark(mark: int | None, probe_pods: Iterable[PodObs], status: SFTJobStatus) -> int | None:
    """The checkpoint step when spare capacity (a scheduled probe pod) was first seen; None while none is."""
    if not any(p.scheduled for p in _live(probe_pods)):
        return None
    if mark is not None:
        return mark
    return checkpoint_step_of(status.artifacts.latest_checkpoint if status.artifacts else None)


def resize_again(prev: SFTJobStatus, train: JobObs) -> bool:
    """The resize of this attempt is recorded and its Job not yet seen deleting: delete it again."""
    last = prev.recoveries[-1] if prev.recoveries else None
    return last is not None and last.to_world_size is not None and recovered(prev, train.uid)


# ---- the capacity probe --------------------------------------------------------------------------------------


def probe_size(spec: SFTJobSpec, queued: bool, train: JobObs | None, train_pods: list[PodObs]) -> int:
    """Placeholder pods wanted now: the nodes an elastic group running with every rank lacks of its most.
    None under Kueue (its quota admits Jobs, not loose pods: docs/recovery.md)."""
    if spec.run_policy.elastic is None or queued or spec.suspend:
        return 0
    if train is None or train.finished or train.deleting or train.suspended or train.nodes is None:
        return 0
    running = sum(1 for p in _live(train_pods) if p.phase == "Running")
    if running < train.nodes:
        return 0
    return max(max_group_nodes(spec) - train.nodes, 0)


def render_probe_job(train_job: Obj, name: str, count: int) -> Obj:
    """The capacity probe: `count` pods shaped as the train Job's (resources, node selector, affinity with
    the avoided nodes, tolerations, priority) that only sleep. They hold the capacity they find until the
    group grows into it (or the probe is deleted)."""
    job = deepcopy(train_job)
    meta = job["metadata"]
    meta["name"] = ChildNames(name).probe_job
    meta["labels"] = {**meta.get("labels", {}), **labels(name, PROBE)}
    spec = job["spec"]
    spec.update(
        completions=count, parallelism=count, completionMode="NonIndexed", backoffLimit=0, suspend=False
    )
    spec.pop("podFailurePolicy", None)
    spec.pop("activeDeadlineSeconds", None)
    template = spec["template"]
    template["metadata"]["labels"] = {**template["metadata"]["labels"], **labels(name, PROBE)}
    pod = template["spec"]
    pod.pop("subdomain", None)
    pod["terminationGracePeriodSeconds"] = 0
    container = pod["containers"][0]
    container["command"] = ["python", "-c", "import time; time.sleep(7 * 24 * 3600)"]
    container["env"] = []
    container["ports"] = []
    return job


def is_probe(job: Obj) -> bool:
    return ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_STAGE) == PROBE
