"""Where kopf keeps its own state about each SFTJob, chosen so that none of it costs an API write per SFTJob
(issue 17 counts the operator's writes per lifecycle with the apiserver's audit log).

- What kopf last handled (`InMemoryDiffBase`): kopf compares every watched SFTJob with the essence it last
  handled to tell create, update and no-op apart. Its AnnotationsDiffBaseStorage writes that essence into an
  annotation: one metadata patch per SFTJob after its create handler, and one after every spec change. Kept
  here it costs no write. Nothing depends on it surviving a restart: an SFTJob this process has not handled
  yet looks new, so its create handler runs the same idempotent reconcile a resume handler would.
- A failing handler's retry bookkeeping (`UnmarkedProgressStorage`): annotations `<prefix>/<handler>`, as
  kopf's AnnotationsProgressStorage writes them, but without its `<prefix>/kopf-managed: yes` marker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

import kopf

from sftjob_api.scheduling import split_child_only


class InMemoryDiffBase(kopf.DiffBaseStorage):
    def __init__(self, ignored_fields: Iterable[Any] = ()) -> None:
        super().__init__(ignored_fields=ignored_fields)
        # uid -> compact JSON: ~1 KiB per SFTJob rather than a nested dict several times that size
        self._essences: dict[str, str] = {}

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        # tolerations/affinity as a digest: a change still shows, but ~300 KB per SFTJob is not kept twice
        essence = super().build(body=body, extra_fields=extra_fields)
        spec, digest = split_child_only(essence.get("spec") or {})
        if digest is not None:
            spec["resources"]["childOnlyDigest"] = digest
            essence["spec"] = spec
        return essence

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


class UnmarkedProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf stores and then purges a handler's progress even when it succeeds at once; the purge drops the
    progress keys from the patch but not the marker, so every SFTJob got one metadata patch carrying only
    `kopf-managed: yes` (audit log: 1.00 per SFTJob), and the reconcile that followed it often wrote its
    status on the copy from before it (a 409 and a re-read). The marker only tells *other* kopf-based
    operators that this prefix is kopf's; this operator removes its own prefix from what it compares anyway
    (`clear`). Overrides a private kopf method: should kopf rename it, the marker write comes back, nothing
    breaks (tests/operator/test_operator_settings.py notices)."""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        return None
