"""Run a command (by default the README's test command) and sample the machine while it runs: CPU busy %
(from /proc/stat, all cores) and memory in use (MemTotal - MemAvailable) every few seconds. Prints a table
at the end; the samples go to a CSV for plots. With the suite it also prints the modules that used the most
CPU (tests/conftest.py's `_module_cpu`: on 2 busy cores, CPU seconds are what a module costs the wall).
docs/testing.md records what it printed.

    python benchmarks/suite_profile.py                          # bash scripts/test.sh
    python benchmarks/suite_profile.py --csv /tmp/s.csv -- bash scripts/test.sh --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODULE_CPU_LOG = "SFTJOB_MODULE_CPU_LOG"  # tests/conftest.py appends one JSON line per module here


def module_cpu_table(log: str, top: int) -> list[str]:
    """The `top` modules by CPU seconds, and the total, as markdown rows."""
    lines = Path(log).read_text().splitlines() if os.path.exists(log) else []
    rows = [json.loads(x) for x in lines if x.strip()]
    if not rows:
        return []
    rows.sort(key=lambda r: -r["cpu_s"])
    total = sum(r["cpu_s"] for r in rows)
    out = [f"\n| module (top {top} of {len(rows)} by CPU) | CPU s | share | wall s |", "|---|---|---|---|"]
    out += [
        f"| {r['module']} | {r['cpu_s']:.0f} | {100 * r['cpu_s'] / total:.1f}% | {r['wall_s']:.0f} |"
        for r in rows[:top]
    ]
    out.append(f"| all {len(rows)} modules | {total:.0f} | 100% | |")
    return out


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def mem_used_mib() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def sample(interval: float, stop: threading.Event, rows: list[tuple[float, float, float]]) -> None:
    t0 = time.monotonic()
    busy0, total0 = cpu_times()
    while not stop.wait(interval):
        busy, total = cpu_times()
        pct = 100.0 * (busy - busy0) / max(total - total0, 1)
        busy0, total0 = busy, total
        rows.append((time.monotonic() - t0, pct, mem_used_mib()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--csv", help="write every sample here (seconds, cpu %%, MiB used)")
    ap.add_argument("--top", type=int, default=25, help="modules listed by CPU seconds")
    ap.add_argument("command", nargs="*", default=["bash", "scripts/test.sh"])
    args = ap.parse_args()

    rows: list[tuple[float, float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(args.interval, stop, rows), daemon=True)
    base = mem_used_mib()
    t0 = time.monotonic()
    cpu_log = os.environ.setdefault(
        MODULE_CPU_LOG, tempfile.mkstemp(prefix="module-cpu-", suffix=".jsonl")[1]
    )
    sampler.start()
    rc = subprocess.call(args.command)
    stop.set()
    sampler.join()
    wall = time.monotonic() - t0

    if args.csv:
        with open(args.csv, "w") as f:
            f.write("seconds,cpu_percent,mem_used_mib\n")
            f.writelines(f"{t:.0f},{c:.1f},{m:.0f}\n" for t, c, m in rows)
    cpu = [c for _, c, _ in rows] or [0.0]
    peak = max((m for _, _, m in rows), default=base)
    print(
        f"\n| command | exit | wall | CPU busy median | CPU busy mean | peak memory in use (before: {base:.0f} MiB) |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| `{' '.join(args.command)}` | {rc} | {wall / 60:.1f} min | {statistics.median(cpu):.0f}% "
        f"| {statistics.fmean(cpu):.0f}% | {peak / 1024:.1f} GiB |"
    )
    print("\n".join(module_cpu_table(cpu_log, args.top)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
