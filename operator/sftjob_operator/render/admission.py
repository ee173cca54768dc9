"""Kueue's partial admission of an elastic training group, decided purely (docs/kueue.md, "Partial admission").

An elastic run (runPolicy.elastic) under Kueue asks for its group at the size it is rendered at
(render/elastic.py: group_size) and lets Kueue admit fewer pods, down to the smallest size the spec allows:

* The train Job carries `kueue.x-k8s.io/job-min-parallelism` (that smallest size) and
  `kueue.x-k8s.io/job-completions-equal-parallelism: "true"`: Kueue admits the most pods its quota fits and
  sets the Job's parallelism *and* completions to that count (its batch/job integration: RunWithPodSetsInfo),
  so the Indexed Job runs one group of that many pods, never waves of ranks.
* Each rank's torchrun `--nnodes` is `$(SFTJOB_NNODES)`, from the pod's annotation `sft.tuning.dev/nnodes`
  through the downward API, and the pods carry the scheduling gate `sft.tuning.dev/group-size`: no pod is
  scheduled, so no container created, before the operator has set the annotation (the kubelet resolves a
  container's env when it creates the container).
* Once Kueue unsuspends the Job with parallelism P, the operator sets the annotation to the largest allowed
  size <= P on each gated pod and removes the gate (one patch per pod), and sets the Job's size label
  (sft.tuning.dev/nodes), so status, `kubectl get sft` and the elastic logic see the group as it runs. Pods
  whose index is >= that size (P is no allowed size) find node_rank >= nnodes and exit 0 at once (`python -m
  sftjob_trainer launch`): their indexes complete, and Kueue reclaims their quota.

Starting at a smaller size is not a recovery: nothing ran, nothing was lost. It is an Event (`GroupAdmitted`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sftjob_api import SFTJobSpec, Stage

from .observe import JobObs, PodObs

NNODES_ENV = "SFTJOB_NNODES"  # the pod's env var that carries the group's size (torchrun --nnodes)


def partial_min(spec: SFTJobSpec, queued: bool, stage: Stage, nodes: int) -> int | None:
    """The fewest nodes Kueue may admit a train Job rendered at `nodes` with: the smallest allowed group
    size, for an elastic run under Kueue; None when the Job is admitted whole (no smaller size allowed)."""
    if not queued or stage != Stage.TRAIN or spec.run_policy.elastic is None:
        return None
    return min((s for s in spec.group_sizes() if s < nodes), default=None)


@dataclass(frozen=True)
class Admitted:
    """A Kueue-sized train Job as Kueue admitted it, and what the operator does about it."""

    nodes: int  # the group's size: the largest allowed size <= parallelism
    parallelism: int  # the pods Kueue admitted
    open: tuple[str, ...]  # gated pods to annotate with `nodes` and ungate
    relabel: bool  # the Job's size label is not `nodes` yet

    @property
    def message(self) -> str:
        extra = self.parallelism - self.nodes
        rest = f"; {extra} more pod(s) exit at once (no allowed size uses them)" if extra else ""
        return f"Kueue admitted {self.parallelism} pod(s): the training group starts at {self.nodes} node(s){rest}"


def plan_admission(spec: SFTJobSpec, train: JobObs | None, pods: Iterable[PodObs]) -> Admitted | None:
    """What Kueue admitted of a train Job rendered for partial admission (None: not such a Job, or not
    admitted now). `pods`: the train Job's pods."""
    if train is None or train.min_parallelism is None or train.parallelism is None:
        return None
    if train.suspended or train.finished or train.deleting:
        return None
    # (no allowed size <= P only when the spec changed since the Job was rendered: the trainer then says why)
    nodes = max((s for s in spec.group_sizes() if s <= train.parallelism), default=train.parallelism)
    gated = tuple(p.name for p in pods if p.gated and not p.deleting)
    return Admitted(nodes, train.parallelism, gated, train.nodes != nodes)
