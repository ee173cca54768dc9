"""DeepSpeed's CPU collectives op (shm_comm), built once into the image and used from a writable copy.

torch's JIT loader takes a lock file inside $TORCH_EXTENSIONS_DIR on every load, even when there is
nothing to build, so that directory must be writable — and trainer pods run with a read-only root
filesystem. The image builds the op into $SFTJOB_TORCH_EXTENSIONS_SEED (read-only) and points
$TORCH_EXTENSIONS_DIR into /tmp (an emptyDir); the first stage process of a pod copies the seed there
(a few MB; timestamps kept, so ninja finds it up to date and nothing is recompiled).
"""

from __future__ import annotations

import os
import shutil
import tempfile


def seed_extensions(seed: str | None, target: str | None) -> bool:
    """Copy `seed` to `target` unless either is unset, the seed is missing or the target exists. Ranks of
    one pod may race: each copies to its own staging directory and renames it into place (atomic); a
    loser finds the target there and drops its copy. True when this call put the copy in place."""
    if not seed or not target or not os.path.isdir(seed) or os.path.exists(target):
        return False
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".extensions-", dir=parent)
    try:
        copy = os.path.join(staging, "copy")
        shutil.copytree(seed, copy, symlinks=True)  # copy2: modification times kept for ninja
        try:
            os.rename(copy, target)
        except OSError:
            if not os.path.isdir(target):
                raise
            return False
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
