"""After a run ended: keep status current, suspend leftovers, and apply runPolicy.ttlSecondsAfterFinished."""

from __future__ import annotations

from datetime import datetime

from sftjob_api import STAGE_TABLE, SFTJobStatus, SpecError, parse_spec, stages

from ..render.names import ChildNames
from ..render.objects import needs_service
from ..render.observe import observe_job
from ..render.status import owned_by
from .children import Children
from .kube import Kube
from .state import Memo, Obj, Snapshot


def after_terminal(
    kube: Kube, children: Children, body: Obj, prev: SFTJobStatus, snap: Snapshot, memo: Memo, now: datetime
) -> None:
    meta = body["metadata"]
    owned = [observe_job(j) for j in snap.jobs if owned_by(j, meta["uid"])]
    # status.restarts counts group restarts (render/recovery.py), not the Job's failed pods: only the
    # generation is kept current here.
    kube.write_status(body, prev.model_copy(update={"observed_generation": meta.get("generation")}))
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError:
        return
    children.stop_unfinished(meta["namespace"], owned)
    ttl = spec.run_policy.ttl_seconds_after_finished
    done_at = prev.completion_time
    if ttl is None or done_at is None or memo.ttl_done:
        return
    if (now - done_at).total_seconds() < ttl:
        return
    names = ChildNames(meta["name"])
    if spec.run_policy.ttl_policy == "DeleteSFTJob":
        kube.post_event(body, "Normal", "TTLExpired", f"deleting the SFTJob {ttl}s after it finished")
        kube.delete_sftjob(meta["namespace"], meta["name"], meta["uid"])
    elif owned:
        # the group stages' Services (a one-pod run has none)
        services = (
            [names.service_of(s) for s in stages(spec) if STAGE_TABLE[s].group] if needs_service(spec) else []
        )
        jobs = [(j.name, j.uid) for j in owned if j.uid]  # only ours (ownerReference), each by its uid
        kube.delete_children(meta["namespace"], jobs, services, meta["uid"])
        kube.post_event(
            body,
            "Normal",
            "TTLExpired",
            f"deleted the child Jobs{' and Services' if services else ''} {ttl}s after it finished;"
            " the SFTJob and its status are kept",
        )
    memo.ttl_done = True
