"""The largest value a pydantic API model accepts: every list and map filled to its cap, every string to its
maximum length. Built from the models themselves, so a changed cap changes it (tests of bounded specs)."""

from __future__ import annotations

import types
import typing
from typing import Any

from annotated_types import MaxLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo


def _max_len(metadata: list[Any]) -> int | None:
    flat = [x for m in metadata for x in (m.metadata if isinstance(m, FieldInfo) else [m])]
    return next((m.max_length for m in flat if isinstance(m, MaxLen)), None)


def _fill(tp: Any, metadata: list[Any], seed: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        return _fill(inner, [*metadata, *meta], seed)
    if origin in (typing.Union, types.UnionType):
        real = [a for a in typing.get_args(tp) if a is not type(None)]
        return _fill(real[0], metadata, seed)
    n = _max_len(metadata)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_fill(item, [], f"{seed}{i}") for i in range(n or 1)]
    if origin is dict:
        key, value = typing.get_args(tp)
        return {_fill(key, [], f"k{seed}{i}"): _fill(value, [], f"{seed}{i}") for i in range(n or 1)}
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return largest(tp, seed)
    if tp is str:
        n = n or 317  # an uncapped string (a map key): the longest its CEL rule allows
        return (seed + "x" * n)[:n] if len(seed) < n else seed[-n:]
    if tp is int:
        return 1
    raise TypeError(f"no largest value for {tp!r}")


def largest(model: type[BaseModel], seed: str = "") -> dict[str, Any]:
    """The largest `model` (as a wire-format dict, camelCase)."""
    out = {}
    for name, f in model.model_fields.items():
        out[f.alias or name] = _fill(f.annotation, list(f.metadata), f"{seed}{name[:1]}")
    return out
