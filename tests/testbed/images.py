"""The images the real node runs (built by tests/testbed/images.sh) and their import into its containerd."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .kube import CACHE

IMAGES_ENV = CACHE / "images" / "images.env"
HINT = "run `bash tests/testbed/provision.sh` (it builds the images with tests/testbed/images.sh)"


@dataclass(frozen=True)
class ImageSet:
    """Image references (tagged by image id) and the archives they were saved to."""

    operator: str
    trainer: str
    pause: str
    archives: dict[str, Path]


def image_set() -> ImageSet:
    if not IMAGES_ENV.exists():
        raise RuntimeError(f"node images not built ({IMAGES_ENV} missing): {HINT}")
    env = dict(line.split("=", 1) for line in IMAGES_ENV.read_text().split() if "=" in line)
    refs = {name: env[f"sftjob_{name}_IMAGE"] for name in ("operator", "trainer", "pause")}
    archives = {refs[name]: Path(env[f"sftjob_{name}_ARCHIVE"]) for name in refs}
    missing = [str(p) for p in archives.values() if not p.exists()]
    if missing:
        raise RuntimeError(f"node image archives missing: {', '.join(missing)}: {HINT}")
    return ImageSet(refs["operator"], refs["trainer"], refs["pause"], archives)


def load_into_containerd(ctr: Path, sock: Path, images: ImageSet, logs_dir: Path) -> None:
    """Import each archive whose tag containerd lacks (its store persists in the cache: once per build)."""
    base = [str(ctr), f"--address={sock}", "--namespace=k8s.io"]
    present = subprocess.run([*base, "images", "ls", "-q"], capture_output=True, text=True, check=True)
    have = set(present.stdout.split())
    with open(logs_dir / "containerd-import.log", "a") as log:
        for ref, archive in images.archives.items():
            if ref in have:
                continue
            t0 = time.monotonic()
            r = subprocess.run(
                [*base, "images", "import", str(archive)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=1800,
            )
            if r.returncode != 0:
                raise RuntimeError(f"ctr images import {archive} failed (see {log.name})")
            log.write(f"imported {ref} in {time.monotonic() - t0:.0f}s\n")
