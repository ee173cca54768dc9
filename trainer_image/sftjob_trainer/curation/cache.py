"""Curated data, computed once: the tokenized train and held-out examples and the data report, stored under a
key derived from everything that determines them, and reused by every later stage, restart and rerun.

Where: `<output.uri>/<namespace>/_curated/<key>/` (sftjob_api.layout.curated_root; `_` cannot begin an
SFTJob name, so it never collides with a run), shared by the runs of one namespace, never across namespaces.
What: `train.npz` and `eval.npz` (token ids and labels, concatenated, with lengths; loaded without pickle),
`report.json` (DataReport.as_dict()), then `COMPLETE` (key, content hash, which run curated it), written last:
a half-written entry is never read. `shards/` beside them holds per-rank training shards (shards.py).

The key hashes: the dataset spec, every input file's content (sha256 of a local file; size and ETag of an
S3 object), the tokenizer (its serialized form and chat template), the training seed (split and mixture),
the base model reference when the perplexity filter scores with it, the versions of transformers and
tokenizers, and the source of the code that curates. Anything that cannot be fingerprinted (a missing file,
an unreachable bucket) means no key: the run curates as if there were no cache, and reports its own error.
A cache entry that fails to load is ignored the same way; it is safe to delete `_curated/` at any time.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from sftjob_api.dataset import DatasetSpec
from sftjob_api.spec import OutputSpec
from sftjob_api.storage import S3Location, Store, s3_client

from ..data import Example

log = logging.getLogger(__name__)

REPORT, COMPLETE = "report.json", "COMPLETE"
PARTS = ("train", "eval")
_PKG = Path(__file__).resolve().parent.parent
# The code whose output is cached: a change to any of these files is a new key.
_CODE = sorted(
    [_PKG / "data.py", _PKG / "formatting.py", _PKG / "records.py", *(_PKG / "curation").glob("*.py")]
)


@dataclass(frozen=True)
class Curated:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any]  # DataReport.as_dict()
    curated_by: str = ""  # "<namespace>/<name>" of the run that curated it


def part_file(part: str) -> str:
    return f"{part}.npz"


def input_fingerprint(uri: str, s3: Callable[[], Any]) -> str:
    """What identifies one input file's content (raises if it cannot be read); `s3()` gives the S3 client."""
    if uri.startswith("s3://"):
        loc = S3Location.parse(uri)
        head = s3().head_object(Bucket=loc.bucket, Key=loc.key)
        return f"s3 {head['ContentLength']} {head['ETag']}"
    with open(uri, "rb") as f:
        return f"sha256 {hashlib.file_digest(f, 'sha256').hexdigest()}"


def tokenizer_fingerprint(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    extra = [type(tok).__name__, getattr(tok, "chat_template", None), str(tok.special_tokens_map)]
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def curation_key(
    ds: DatasetSpec, inputs: dict[str, str], tokenizer: str, seed: int, model: str | None
) -> str:
    """The cache key (pure): `inputs` maps each input URI to its fingerprint; `model` (the base model's
    reference) only when the perplexity filter scores with it."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    for part in (
        ds.model_dump_json(by_alias=True),
        json.dumps(sorted(inputs.items())),
        tokenizer,
        str(seed),
        model or "",
        f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}",
        *(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}" for p in _CODE),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def input_uris(ds: DatasetSpec) -> list[str]:
    return [*(f for s in ds.resolved_sources() for f in s.files), *(ds.eval or [])]


def key_for(ds: DatasetSpec, tok: Any, seed: int, model: str | None, output: OutputSpec | None) -> str | None:
    """The key of this curation, or None when an input cannot be fingerprinted (then curate reports it)."""
    try:
        s3 = functools.cache(lambda: s3_client(output))  # one client for all the inputs
        inputs = {uri: input_fingerprint(uri, s3) for uri in input_uris(ds)}
    except Exception as e:  # missing file, no access: the curation itself names the source, file and line
        log.info("curated data cache off: %s", e)
        return None
    return curation_key(ds, inputs, tokenizer_fingerprint(tok), seed, model)


def encode(examples: list[Example], **extra: np.ndarray) -> bytes:
    """Examples as one npz: lengths, then every token id and label concatenated (no pickle needed to read)."""
    arrays = {
        "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int64),
        "ids": np.array([x for e in examples for x in e.input_ids], dtype=np.int32),
        "labels": np.array([x for e in examples for x in e.labels], dtype=np.int32),
        **extra,
    }
    buf = io.BytesIO()
    np.savez(buf, **cast(dict[str, Any], arrays))  # (numpy's stubs take the keywords for its flags)
    return buf.getvalue()


def decode(data: bytes) -> tuple[list[Example], dict[str, np.ndarray]]:
    """(examples, the other arrays of the file)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    ids, labels = arrays.pop("ids").tolist(), arrays.pop("labels").tolist()
    out, at = [], 0
    for n in arrays.pop("lengths").tolist():
        out.append(Example(ids[at : at + n], labels[at : at + n]))
        at += n
    return out, arrays


def marker(store: Store, key: str) -> dict[str, Any] | None:
    """The entry's COMPLETE marker, or None while the entry is absent or half-written."""
    try:
        if not store.exists(f"{key}/{COMPLETE}"):
            return None
        return dict(json.loads(store.get_bytes(f"{key}/{COMPLETE}")))
    except Exception as e:
        log.warning("curated data %s unreadable, curating again: %s", key, e)
        return None


def load(store: Store, key: str, parts: tuple[str, ...] = PARTS) -> Curated | None:
    """The cached entry with the `parts` asked for (the others empty), or None (absent, incomplete, or
    unreadable: then it is recomputed)."""
    done = marker(store, key)
    if done is None:
        return None
    try:
        got = {p: decode(store.get_bytes(f"{key}/{part_file(p)}"))[0] if p in parts else [] for p in PARTS}
        report = load_report(store, key)
    except Exception as e:
        log.warning("curated data %s unreadable, curating again: %s", key, e)
        return None
    return Curated(got["train"], got["eval"], report, str(done.get("curated_by", "")))


def load_report(store: Store, key: str) -> dict[str, Any]:
    return dict(json.loads(store.get_bytes(f"{key}/{REPORT}")))


def save(store: Store, key: str, c: Curated) -> bool:
    """Write an entry, COMPLETE last. A failure is logged and returns False: the run has its data already."""
    try:
        store.put_bytes(encode(c.train), f"{key}/{part_file('train')}")
        store.put_bytes(encode(c.eval), f"{key}/{part_file('eval')}")
        store.put_bytes(json.dumps(c.report, indent=1).encode(), f"{key}/{REPORT}")
        done = {"key": key, "content_hash": c.report.get("content_hash"), "curated_by": c.curated_by}
        store.put_bytes(json.dumps(done).encode(), f"{key}/{COMPLETE}")
        return True
    except Exception as e:
        log.warning("curated data %s not saved: %s", key, e)
        return False
