"""`sftjob run`'s interrupt handling without torch: the message it prints (what is saved, how to resume), and a
real signal to a real process tree: the stage gets SIGTERM, is killed after the grace period if it ignores it,
and nothing it started outlives it. The full pipeline is in tests/pipeline/test_sftjob_interrupt.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from sftjob_operator.local.interrupt import exit_code, resume_command, stop_lines

CMD = "sftjob run job.yaml --work-dir /w"


def test_exit_codes_follow_the_shell_convention():
    assert (exit_code(signal.SIGINT), exit_code(signal.SIGTERM)) == (130, 143)


def test_resume_command_is_the_same_command_without_fresh():
    assert resume_command("job.yaml", None, False, "/w") == CMD
    assert (
        resume_command("my job.yaml", "out", True, None)
        == "sftjob run 'my job.yaml' --output out --embedded-s3"
    )


def test_training_interrupted_names_the_checkpoint_it_resumes_from():
    lines = stop_lines(signal.SIGINT, "Training", "train", "", [], ["train", "eval", "merge"], 8, CMD)
    assert lines == [
        "interrupted by SIGINT in phase Training: the train stage stopped",
        "no stage completed yet",
        "checkpoint step-8 saved (training resumes from it)",
        f"to resume, run the same command (it runs train, eval, merge): {CMD}",
    ]
    lines = stop_lines(signal.SIGTERM, "Training", "train", "", [], ["train"], None, CMD)
    assert "no checkpoint saved yet (training starts from step 0)" in lines


def test_later_phase_interrupted_lists_completed_stages_and_no_checkpoint_line():
    why = "it did not exit within 300s"
    lines = stop_lines(signal.SIGTERM, "Merging", "merge", why, ["train", "eval"], ["merge"], None, CMD)
    assert lines == [
        f"interrupted by SIGTERM in phase Merging: the merge stage was killed ({why})",
        "saved: completed stage(s) train, eval (skipped when resumed)",
        f"to resume, run the same command (it runs merge): {CMD}",
    ]
    done = stop_lines(signal.SIGINT, "Merging", None, "", ["train", "merge"], [], None, CMD)
    assert done[0].endswith("no stage was running") and "nothing to redo" in done[-1]


# A stand-in for `sftjob run`: one stage whose process starts a grandchild (as launch starts torchrun and the
# workers), both ignoring SIGTERM when asked to; prints the pids, then the exit code and the kill reason.
RUNNER = textwrap.dedent(
    """
    import subprocess, sys
    from sftjob_operator.local.interrupt import Interrupt
    from sftjob_operator.local.process import ChildProcess

    STAGE = '''
    import os, signal, subprocess, sys, time
    if sys.argv[1] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kid = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"], stdout=subprocess.DEVNULL)
    print('{"event": "pids", "pids": [%d, %d]}' % (os.getpid(), kid.pid), flush=True)
    time.sleep(60)
    '''
    intr = Interrupt(grace_s=float(sys.argv[2]))
    intr.install()
    child = ChildProcess("stage", [sys.executable, "-c", STAGE, sys.argv[1]], {}, sys.argv[3])
    rc = child.run(lambda ev: print(ev["pids"], flush=True), intr)
    print(rc, intr.signum, repr(intr.killed), flush=True)
    """
)


def run_and_interrupt(tmp_path: Path, mode: str, grace_s: float) -> tuple[list[int], str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, mode, str(grace_s), str(tmp_path / "stage.log")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    pids = json.loads(proc.stdout.readline())  # the stage and its grandchild are running
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    return pids, out.strip(), time.monotonic() - t0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stage_gets_sigterm_and_nothing_it_started_outlives_it(tmp_path):
    pids, out, took = run_and_interrupt(tmp_path, "obey", grace_s=20)
    assert out == f"-{signal.SIGTERM} {signal.SIGINT} ''"  # ended by the SIGTERM passed on; not killed
    assert took < 10
    assert not any(alive(p) for p in pids)  # its grandchild ignored SIGTERM: killed with the group


def test_stage_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    pids, out, took = run_and_interrupt(tmp_path, "ignore", grace_s=1)
    assert out == f"-{signal.SIGKILL} {signal.SIGINT} 'it did not exit within 1s'"
    assert 1 <= took < 10
    assert not any(alive(p) for p in pids)
