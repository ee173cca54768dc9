"""The images the real node runs (built by tests/testbed/images.sh) and their import into its containerd."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .kube import CACHE, read_env_file

IMAGES_ENV = CACHE / "images" / "images.env"
HINT = "run `bash tests/testbed/provision.sh` (it builds the images with tests/testbed/images.sh)"


@dataclass(frozen=True)
class ImageSet:
    """Image references, each tagged by its podman image id."""

    operator: str
    trainer: str
    pause: str

    def all(self) -> tuple[str, ...]:
        return (self.pause, self.operator, self.trainer)


def image_set() -> ImageSet:
    env = read_env_file(IMAGES_ENV, f"node images not built ({IMAGES_ENV} missing): {HINT}")
    images = ImageSet(*(env[f"sftjob_{name}_IMAGE"] for name in ("operator", "trainer", "pause")))
    for ref in images.all():
        if subprocess.run(["podman", "image", "exists", ref]).returncode != 0:
            raise RuntimeError(f"image {ref} is not in podman's store: {HINT}")
    return images


def load_into_containerd(ctr: Path, sock: Path, images: ImageSet, logs_dir: Path) -> None:
    """Stream each image containerd lacks from podman (`podman save | ctr images import -`): no archive on
    disk, and containerd's store persists in the cache, so a build is imported once."""
    base = [str(ctr), f"--address={sock}", "--namespace=k8s.io"]
    present = subprocess.run([*base, "images", "ls", "-q"], capture_output=True, text=True, check=True)
    have = set(present.stdout.split())
    # Earlier builds of the same images, GBs each, go (containerd then collects their layers); so do the
    # id-named duplicates `ctr import` adds for a docker archive ("sha256:<image id>"), which hold the same.
    wanted = set(images.all())
    repos = {ref.rsplit(":", 1)[0] for ref in wanted}
    stale = [
        ref
        for ref in have
        if ref.startswith("sha256:") or (ref.rsplit(":", 1)[0] in repos and ref not in wanted)
    ]
    if stale:
        subprocess.run([*base, "images", "rm", *stale], capture_output=True, check=False)
    with open(logs_dir / "containerd-import.log", "a") as log:
        for ref in images.all():
            if ref in have:
                continue
            t0 = time.monotonic()
            save = subprocess.Popen(
                ["podman", "save", "--format", "docker-archive", ref], stdout=subprocess.PIPE, stderr=log
            )
            r = subprocess.run([*base, "images", "import", "-"], stdin=save.stdout, stdout=log, stderr=log)
            save.stdout.close()  # type: ignore[union-attr]
            if save.wait() != 0 or r.returncode != 0:
                raise RuntimeError(f"importing {ref} into the node's containerd failed (see {log.name})")
            log.write(f"imported {ref} in {time.monotonic() - t0:.0f}s\n")
            log.flush()
