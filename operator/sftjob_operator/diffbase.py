"""kopf's "last handled" essence of each SFTJob, kept in this process instead of in an annotation.

kopf compares every watched SFTJob with the essence it last handled to tell create, update and no-op apart.
Its AnnotationsDiffBaseStorage writes that essence into an annotation: one metadata patch per SFTJob after
its create handler, and one after every spec change (issue 17 counts the operator's writes per lifecycle).
Kept here it costs no write. Nothing depends on it surviving a restart: an SFTJob this process has not
handled yet looks new, so its create handler runs the same idempotent reconcile a resume handler would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

import kopf


class InMemoryDiffBase(kopf.DiffBaseStorage):
    def __init__(self, ignored_fields: Iterable[Any] = ()) -> None:
        super().__init__(ignored_fields=ignored_fields)
        # uid -> compact JSON: ~1 KiB per SFTJob rather than a nested dict several times that size
        self._essences: dict[str, str] = {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        text = self._essences.get(body.metadata.uid or "")
        return cast(kopf.BodyEssence, json.loads(text)) if text is not None else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._essences[body.metadata.uid or ""] = json.dumps(essence, separators=(",", ":"))

    def forget(self, uid: str) -> None:
        """The SFTJob is gone: drop its essence."""
        self._essences.pop(uid, None)

    def __len__(self) -> int:
        return len(self._essences)
