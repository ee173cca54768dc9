"""Reading raw rows from JSONL / Parquet files, local or on S3, with a drop report (torch-free).

Malformed rows are never fatal on their own: they are counted by reason with their file:line so the user
can fix the data; the caller decides whether what is left is enough (empty data is a permanent error).
"""

from __future__ import annotations

import codecs
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sftjob_api.exit_codes import PermanentError
from sftjob_api.spec import OutputSpec
from sftjob_api.storage import S3Location, download_file, s3_client

MAX_EXAMPLES_PER_REASON = 5


@dataclass
class DropReport:
    """How many rows were dropped and why; a few examples (file:line + detail) per reason."""

    total_rows: int = 0
    kept_rows: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES_PER_REASON:
            ex.append(f"{where}: {detail}" if detail else where)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_rows": self.total_rows,
            "kept_rows": self.kept_rows,
            "dropped": dict(self.dropped),
            "examples": self.examples,
        }

    def summary(self) -> str:
        parts = [f"{self.kept_rows}/{self.total_rows} rows kept"]
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"{reason}={n} (e.g. {'; '.join(self.examples.get(reason, [])[:2])})")
        return ", ".join(parts)


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "file:line" (JSONL) or "file:row" (Parquet), 1-based


def _local_copy(uri: str, cache_dir: str | None, output: OutputSpec | None) -> str:
    if not uri.startswith("s3://"):
        if not os.path.exists(uri):
            raise PermanentError(f"dataset file not found: {uri}")
        return uri
    loc = S3Location.parse(uri)
    dest_dir = cache_dir or tempfile.mkdtemp(prefix="sftjob-data-")
    dest = os.path.join(dest_dir, loc.bucket, loc.key)
    download_file(loc, dest, s3_client(output))
    return dest


def _decode(raw: bytes, lineno: int) -> str:
    """One line as text: UTF-8, a leading BOM (utf-8-sig) dropped on line 1; UnicodeDecodeError otherwise."""
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    return raw.decode("utf-8")


def iter_jsonl(path: str, name: str, report: DropReport) -> Iterator[Row]:
    """Stream a JSONL file line by line (constant memory); bad lines go to the report: `invalid_utf8` (never
    replaced and trained on), `malformed_json` (also: not an object, nested too deeply). CRLF and a UTF-8 BOM
    are fine."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = _decode(raw, lineno)
            except UnicodeDecodeError as e:
                report.total_rows += 1
                report.drop("invalid_utf8", f"{name}:{lineno}", f"byte {e.start}: {e.reason}")
                continue
            if not line.strip():
                continue
            report.total_rows += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.drop("malformed_json", f"{name}:{lineno}", f"{e.msg} (column {e.colno})")
                continue
            except RecursionError:
                report.drop("malformed_json", f"{name}:{lineno}", "JSON nested too deeply")
                continue
            if not isinstance(obj, dict):
                report.drop("malformed_json", f"{name}:{lineno}", "row is not a JSON object")
                continue
            yield Row(obj, f"{name}:{lineno}")


def iter_parquet(path: str, name: str, report: DropReport) -> Iterator[Row]:
    """Stream a Parquet file record batch by record batch."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise PermanentError(f"{name}: not a readable Parquet file: {e}") from e
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            n += 1
            report.total_rows += 1
            yield Row(obj, f"{name}:{n}")


def iter_rows(
    uris: list[str], report: DropReport, cache_dir: str | None = None, output: OutputSpec | None = None
) -> Iterator[Row]:
    for uri in uris:
        path = _local_copy(uri, cache_dir, output)
        if uri.endswith(".parquet") or uri.endswith(".pq"):
            yield from iter_parquet(path, uri, report)
        else:
            yield from iter_jsonl(path, uri, report)
