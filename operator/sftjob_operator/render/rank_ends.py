"""Which rank took the group down (pure): every rank's end read from its pod, and the one that ended first
by a signal, an OOM kill or an error of its own, rather than by its peers' failure.

Why: when one rank dies its peers fail a few seconds later with a collective error (gloo: "Connection closed
by peer"; NCCL: a communicator abort or a collective timeout), and every rank's launcher exits 1. Measured on
the real node: rank 1's trainer SIGKILLed at step 6 made rank 0 exit 1 with a collective error, and the
cause recorded was rank 0's, the first pod seen. Bad-node avoidance and a user's debugging both follow the
cause, so it must name the rank that died.
"""

from __future__ import annotations

import re
import signal as signals
from collections.abc import Iterable
from datetime import UTC, datetime

from sftjob_api.exit_codes import ExitCode
from sftjob_api.status import MAX_RANK_ENDS, RankEnd

from .observe import PodObs

# torchrun's error summary for a worker killed by a signal: "exitcode  : -9 (pid: 41)" and
# "traceback : Signal 9 (SIGKILL) received by PID 41".
_SIGNAL_IN_LOG = re.compile(r"Signal (\d+) \(SIG[A-Z0-9]+\) received|exitcode\s*:\s*-(\d+)")
# What a rank says when a peer went away: gloo's transport errors, NCCL's aborts, a collective timeout.
_COLLECTIVE_ERROR = re.compile(
    r"connection (closed|reset) by peer|broken pipe|DistBackendError|NCCL (error|communicator)"
    r"|ProcessGroup\w*|collective operation timeout|Timed out waiting|gloo/transport",
    re.IGNORECASE,
)
_NEVER = datetime.max.replace(tzinfo=UTC)


def signal_of(pod: PodObs) -> int | None:
    """The signal that ended the pod's trainer: the container's own, a 128+N exit code (not 143: SIGTERM is
    a requested stop that saved a checkpoint), or the one torchrun reports in the termination message."""
    stated = _stated_signal(pod)
    if stated is not None:
        return stated
    code = pod.exit_code
    if code is not None and 128 < code < 160 and code != ExitCode.PREEMPTED:
        return code - 128
    return None


def _stated_signal(pod: PodObs) -> int | None:
    """The signal the container status or torchrun's log names (an exit code 137 already says it)."""
    if pod.signal:
        return pod.signal
    m = _SIGNAL_IN_LOG.search(pod.termination_message or "")
    return int(m.group(1) or m.group(2)) if m else None


def _signal_name(sig: int) -> str:
    try:
        return signals.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def consequence(pod: PodObs) -> bool:
    """An end caused by another rank's: a collective error, or the teardown's SIGTERM/deletion."""
    if pod.terminated_reason == "OOMKilled" or signal_of(pod) is not None:
        return False
    if pod.deleting or pod.exit_code == ExitCode.PREEMPTED:
        return True
    return bool(_COLLECTIVE_ERROR.search(pod.termination_message or ""))


def rank_end(pod: PodObs) -> RankEnd:
    return RankEnd(
        rank=pod.index,
        pod=pod.name,
        exit_code=pod.exit_code,
        signal=signal_of(pod),
        reason=pod.reason or pod.terminated_reason or None,
        finished_at=pod.finished_at,
        consequence=consequence(pod),
    )


def _order(pod: PodObs) -> tuple[datetime, int, str]:
    return (pod.finished_at or _NEVER, pod.index if pod.index is not None else 1 << 30, pod.name)


def first_failed(pods: Iterable[PodObs]) -> PodObs | None:
    """The failed pod that took the group down: the first to end (finishedAt, then rank) among those that
    ended on their own (signal, OOM kill, an error that is not a collective one); if every rank's end looks
    like a consequence, simply the first to end."""
    failed = sorted((p for p in pods if p.phase == "Failed"), key=_order)
    own = [p for p in failed if not consequence(p)]
    first = own or failed
    return first[0] if first else None


def rank_ends(pods: Iterable[PodObs], cause: PodObs | None) -> list[RankEnd]:
    """Every ended rank's end, the cause first, then in the order they ended (at most MAX_RANK_ENDS)."""
    ended = sorted((p for p in pods if p.phase in ("Failed", "Succeeded")), key=_order)
    if cause is not None and cause in ended:
        ended.remove(cause)
        ended.insert(0, cause)
    return [rank_end(p) for p in ended[:MAX_RANK_ENDS]]


def describe(pod: PodObs) -> str:
    """How a pod ended, in the cause's words: "OOMKilled, exit code 137", "signal 9 (SIGKILL), exit code 1",
    "Evicted, exit code 137", "exit code 1"."""
    sig = _stated_signal(pod)
    if pod.terminated_reason and pod.terminated_reason not in ("Error", "Completed"):
        what = pod.terminated_reason  # e.g. OOMKilled
        if pod.exit_code is not None:
            what += f", exit code {pod.exit_code}"
    elif sig is not None:
        what = f"signal {sig} ({_signal_name(sig)})"
        if pod.exit_code is not None:
            what += f", exit code {pod.exit_code}"
    elif pod.exit_code is not None:
        what = f"exit code {pod.exit_code}"
    else:
        what = pod.reason or "failed"
    if pod.reason and not what.startswith(pod.reason):
        what = f"{pod.reason}, {what}"  # e.g. Evicted, exit code 137
    return what
