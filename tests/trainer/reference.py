"""The uninterrupted 2-rank LoRA run that the crash and group-restart tests compare against, bit for bit.

The crash tests (tests/chaos/test_trainer_kill9.py, tests/trainer/test_collective_timeout.py) each end a
run somewhere, resume it and require the reference's losses and final adapter exactly. Where their runs
differ from the reference only in what must not change the numbers (checkpoint cadence, output store,
torchrun with 2 processes or 2 agents of 1), they share this one run: it is computed once per suite, by the
first xdist worker that asks (the others wait on its lock and read its files), because every 2-rank launch
costs ~40 CPU seconds of a 2-core machine. That sharing is itself checked: a checkpoint that changed the
training, or a 2-agent group that summed differently, would fail those tests' equality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftjob_api.ports import free_port

from .runner import json_events, launch_cmd, make_config, run, trainer_env, write_config
from .tiny import dataset_rows, write_jsonl

MAX_STEPS = 12
RANKS = 2


def data_file(directory: Path) -> str:
    """The reference's training data (120 rows, seed 5), written into `directory`."""
    return write_jsonl(str(directory / "train.jsonl"), dataset_rows(120, seed=5))


def config(model_dir: str, data: str, output_root: str, work_dir: str, **over: Any) -> dict[str, Any]:
    """The reference's trainer config; `over` (checkpoint_steps, runPolicy, ...) must not change the numbers."""
    settings: dict[str, Any] = {
        "max_steps": MAX_STEPS,
        "global_batch": 8,
        "micro": 2,
        "checkpoint_steps": 1000,
    }
    return make_config(model_dir, data, output_root, work_dir, **{**settings, **over})


@dataclass(frozen=True)
class Reference:
    losses: list[float]  # per step, 1..MAX_STEPS
    events: list[dict[str, Any]]  # every JSON event of both ranks
    output: Path  # its output root (adapter/ ...)

    def adapter(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.output / "adapter" / "adapter_model.safetensors"))


def two_rank_reference(shared: Path, model_dir: str) -> Reference:
    """Run the reference into `shared` unless a worker already did; `shared` is common to all workers."""
    from filelock import FileLock

    shared.mkdir(parents=True, exist_ok=True)
    done = shared / "events.json"
    with FileLock(str(shared / "lock")):
        if not done.exists():
            cfg = config(model_dir, data_file(shared), str(shared / "out"), str(shared / "work"))
            res = run(
                launch_cmd(write_config(str(shared / "ref.json"), cfg), RANKS, free_port()), trainer_env()
            )
            assert res.returncode == 0, res.stderr[-4000:]
            done.write_text(json.dumps(json_events(res.stdout)))
    events = json.loads(done.read_text())
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == MAX_STEPS, losses
    return Reference(losses, events, shared / "out")
