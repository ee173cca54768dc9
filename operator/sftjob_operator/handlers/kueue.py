"""Suspend and resume of a Kueue-managed SFTJob (label kueue.x-k8s.io/queue-name) go through Kueue.

Kueue owns the `suspend` of a Job it manages: it unsuspends a suspended Job whose Workload is admitted, so
setting the child Job's `spec.suspend` would be undone at once. What Kueue documents instead (and what
`kueuectl stop workload` does) is the Workload's `spec.active`: `false` evicts an admitted Workload (reason
Deactivated), Kueue suspends the Job and releases the quota; `true` queues it again. See docs/kueue.md.
"""

from __future__ import annotations

import logging

from ..render.observe import JobObs
from .kube import Kube
from .state import Memo

log = logging.getLogger("sftjob_operator.kueue")

WORKLOAD_API = ("kueue.x-k8s.io", "v1beta2", "workloads")  # group, version, plural
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # Kueue's label on the Workload of a Job


def sync_workload_active(kube: Kube, namespace: str, job: JobObs, active: bool, memo: Memo) -> bool:
    """Make the Workload of this Job `active` (the SFTJob not suspended) or not. True when Kueue handles it
    (written now, or earlier by this process); False when there is no Workload (yet, or no Kueue API):
    the caller then sets the Job's own `suspend`, which Kueue has not taken over."""
    if not job.uid:
        return False
    if memo.workload_active.get(job.name) == (job.uid, active):
        return True
    written = kube.set_workloads_active(namespace, JOB_UID_LABEL, job.uid, active, WORKLOAD_API)
    if written:
        log.info("%s/%s: Workload active=%s", namespace, job.name, active)
    if written or active:  # nothing to resume when there is no Workload: a new one is active
        memo.workload_active[job.name] = (job.uid, active)
    return bool(written)
