"""Bytes the operator's SFTJob index keeps for 20 SFTJobs carrying the largest accepted affinity and
tolerations (tracemalloc around slim_sftjob). Run: PYTHONPATH=operator:tests python benchmarks/slim_index_memory.py"""

from __future__ import annotations

import json
import tracemalloc

from largest_spec import largest

from sftjob_api.scheduling import Affinity, Toleration
from sftjob_operator.handlers.state import slim_sftjob


def main() -> None:
    resources = {
        "affinity": largest(Affinity),
        "tolerations": [largest(Toleration, str(i)) for i in range(64)],
    }
    body = {"metadata": {"name": "x", "namespace": "n", "uid": "u"}, "spec": {"resources": resources}}
    text = json.dumps(body)
    tracemalloc.start()
    kept = [slim_sftjob(json.loads(text)) for _ in range(20)]
    current, _ = tracemalloc.get_traced_memory()
    print(
        f"index of 20 SFTJobs ({len(text) / 1024:.0f} KiB each): {current / 1024 / 1024:.2f} MiB ({len(kept)})"
    )


if __name__ == "__main__":
    main()
