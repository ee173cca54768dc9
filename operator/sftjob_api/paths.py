"""Joining a name someone else chose (an S3 key, a manifest entry) onto a local directory, safely.

Object keys and manifest entries are tenant-writable: `os.path.join(dest, "/abs")` is "/abs", a key
`p//abs/x` under prefix `p/` leaves "/abs/x", and `..` climbs out. Every download goes through `safe_join`
before it writes anything (issue 25, item 5).
"""

from __future__ import annotations

import os

from .exit_codes import PermanentError


class UnsafePath(PermanentError):
    """A key or path that would be written outside its destination directory."""


def safe_join(dest: str | os.PathLike[str], rel: str, what: str) -> str:
    """`dest/rel`, only when it stays under `dest`: no absolute path, no `..` part, and (symlinks already in
    `dest` resolved) inside it; else UnsafePath naming `what` (e.g. "S3 key s3://b/p/../x")."""
    norm = rel.replace("\\", "/")
    if not rel or norm.startswith("/") or os.path.isabs(rel):
        raise UnsafePath(f"{what}: {rel!r} is an absolute or empty path; nothing is written outside {dest}")
    if ".." in norm.split("/"):
        raise UnsafePath(f"{what}: {rel!r} contains '..'; nothing is written outside {dest}")
    base = os.path.realpath(dest)
    target = os.path.realpath(os.path.join(base, rel))
    if target == base or os.path.commonpath([base, target]) != base:
        raise UnsafePath(f"{what}: {rel!r} resolves to {target}, outside {dest}")
    return os.path.join(os.fspath(dest), rel)
