"""The trainer's copy of the image's prebuilt torch extensions into a writable directory (trainer pods run
with a read-only root filesystem; torch locks a file in the extensions directory on every load)."""

from __future__ import annotations

import os
from pathlib import Path

from sftjob_trainer.extensions import seed_extensions


def _seed(root: Path) -> Path:
    op = root / "seed" / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    (op / "build.ninja").write_text("rule cxx\n")
    (op / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    os.utime(op / "deepspeed_shm_comm.so", (1_000_000, 1_000_000))
    return root / "seed"


def test_copies_once_keeping_timestamps(tmp_path: Path) -> None:
    seed = _seed(tmp_path)
    target = tmp_path / "tmp" / "torch_extensions"
    assert seed_extensions(str(seed), str(target)) is True
    so = target / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    assert so.read_bytes() == b"\x7fELF"
    assert so.stat().st_mtime == 1_000_000  # kept: ninja decides "up to date" by times
    # a second rank (or stage) finds it in place and leaves it alone, with no staging directory left behind
    (target / "deepspeed_shm_comm" / "lock").write_text("")
    assert seed_extensions(str(seed), str(target)) is False
    assert (target / "deepspeed_shm_comm" / "lock").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["torch_extensions"]


def test_nothing_to_do_without_a_seed(tmp_path: Path) -> None:
    target = tmp_path / "torch_extensions"
    assert seed_extensions(None, str(target)) is False
    assert seed_extensions(str(tmp_path / "missing"), str(target)) is False
    assert seed_extensions(str(_seed(tmp_path)), None) is False
    assert not target.exists()
