"""Why the parallel suite sets OMP_NUM_THREADS (docs/testing.md, "In parallel"): N torch processes at once,
each with T OpenMP threads, on this machine's cores. Each process runs the same small training loop (MLP,
AdamW, 300 steps). Prints one row per setting; run it on an idle machine.

    python benchmarks/omp_oversubscription.py            # 4 processes, threads = cores and 1; 1 process alone
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

LOOP = """
import time, torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))
x = torch.randn(64, 512)
opt = torch.optim.AdamW(m.parameters())
t = time.time()
for _ in range(300):
    opt.zero_grad(); m(x).pow(2).mean().backward(); opt.step()
print(f"{time.time() - t:.2f}")
"""


def run(processes: int, threads: int) -> tuple[float, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-c", LOOP], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    each = [float(p.communicate()[0].strip()) for p in procs]
    return time.monotonic() - t0, each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=4)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"| processes | OMP threads each | wall | loop time per process (s) | cores: {cores} |")
    print("|---|---|---|---|---|")
    for processes, threads in ((1, cores), (args.processes, cores), (args.processes, 1)):
        wall, each = run(processes, threads)
        print(f"| {processes} | {threads} | {wall:.1f} s | {min(each):.1f} to {max(each):.1f} | |")


if __name__ == "__main__":
    main()
