"""Generated SFTJob manifests for the spec fuzzing suite (test_spec_fuzz.py), drawn with hypothesis from the
pydantic models: a valid base manifest, then 1 to 4 mutations at paths walked out of `SFTJobSpec` — random
types, out-of-range numbers, unknown enum values, wrong nesting, unknown keys, missing required keys, huge
strings, unicode, shell metacharacters (each one a command that would create the marker file), and dotted
or 63-character names.
"""

from __future__ import annotations

import copy
import re
import typing
from typing import Any

from hypothesis import strategies as st
from pydantic import BaseModel

from sftjob_api import SFTJobSpec

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def model_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field path of the spec in wire (camelCase) names, objects and leaves alike."""
    out: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        path = (*prefix, info.alias or name)
        out.append(path)
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out += model_paths(arg, path)
    return out


PATHS = model_paths(SFTJobSpec)


def shell_strings(marker: str) -> st.SearchStrategy[str]:
    """Strings that would create `marker` if any part of the system passed them to a shell."""
    forms = [
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"x; touch {marker}",
        f"x && touch {marker} #",
        f"x | touch {marker}",
        f"x\ntouch {marker}",
        f"'; touch {marker}; '",
        f'"; touch {marker}; "',
        f"${{IFS}}touch${{IFS}}{marker}",
    ]
    return st.sampled_from(forms)


def values(marker: str) -> st.SearchStrategy[Any]:
    text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-10, 100_000_000_000),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
        st.integers(1_000, 200_000).map(lambda n: "x" * n),  # huge strings
        st.sampled_from(["lora", "qlora", "full", "bfloat16", "float16", "cosine", "bogus", "LoRA", ""]),
        st.sampled_from(["s3://b/k", "s3://Bad_Bucket/x", "/abs/path", "../up", "pvc://c/p", "http://x"]),
        shell_strings(marker),
    )
    return st.recursive(
        scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=6
    )


def label_maps(marker: str) -> st.SearchStrategy[dict[str, Any]]:
    key = st.one_of(
        st.from_regex(r"\A([a-z0-9]{1,10}\.){0,2}[a-z]{1,8}/[A-Za-z0-9][-A-Za-z0-9_.]{0,62}\Z"),
        st.from_regex(r"\A[A-Za-z0-9][-A-Za-z0-9_.]{0,70}\Z"),
        st.text(max_size=20),
        shell_strings(marker),
    )
    return st.dictionaries(key, st.one_of(st.text(max_size=70), shell_strings(marker)), max_size=3)


# Admissible edits (most manifests the other mutations make are refused at admission): these reach the
# operator, where the ./relative ones are its own InvalidSpec and the rest run (suspended) or not.
ADMISSIBLE: tuple[tuple[tuple[str, ...], st.SearchStrategy[Any]], ...] = (
    (("training", "learningRate"), st.floats(1e-7, 0.9)),
    (("training", "maxSteps"), st.integers(1, 10_000_000)),
    (("training", "globalBatchSize"), st.sampled_from([1, 2, 4, 8, 16, 64])),
    (("training", "microBatchSize"), st.sampled_from([1, 2, 4])),
    (("method", "type"), st.sampled_from(["lora", "qlora", "full"])),
    (("method", "lora", "r"), st.integers(1, 1024)),
    (("dataset", "maxSeqLength"), st.integers(16, 131072)),
    (("dataset", "format"), st.sampled_from(["alpaca", "messages", "prompt_completion"])),
    (("resources", "nodes"), st.integers(1, 4)),
    (("resources", "gpusPerNode"), st.integers(0, 8)),
    (("resources", "image"), st.from_regex(r"\A[a-z0-9][a-z0-9./-]{0,40}(:[a-z0-9.]{1,10})?\Z")),
    (("model", "uri"), st.sampled_from(["s3://models/m", "/models/m", "smollm2-135m-instruct", "./m"])),
    (("output", "uri"), st.sampled_from(["s3://out/x", "/mnt/out", "./runs", "runs/x"])),
    (("eval", "enabled"), st.booleans()),
    (("merge", "enabled"), st.booleans()),
    (("runPolicy", "backoffLimit"), st.integers(0, 10)),
    (("suspend",), st.booleans()),
)


def names() -> st.SearchStrategy[str]:
    plain = st.one_of(st.just("fz"), st.from_regex(r"\A[a-z][-a-z0-9]{0,20}\Z"))
    return st.one_of(
        plain,
        plain,
        plain,
        st.from_regex(r"\A[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){1,3}\Z"),  # dotted (a DNS subdomain: not a label)
        st.just("n" * 50),  # longer than the 42 the CRD allows; the index makes it 63 at most
    )


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        nxt = obj.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            obj[key] = nxt
        obj = nxt
    obj[path[-1]] = value


def _delete(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        obj = obj.get(key)  # type: ignore[assignment]
        if not isinstance(obj, dict):
            return
    obj.pop(path[-1], None)


@st.composite
def mutation(draw: st.DrawFn, marker: str) -> tuple[str, tuple[str, ...], Any]:
    kind = draw(
        st.sampled_from(
            ["set", "set", "unknown_key", "delete", "labels", "k8s_objects", "strings", *["admissible"] * 5]
        )
    )
    if kind == "admissible":
        path, strategy = draw(st.sampled_from(ADMISSIBLE))
        return "set", path, draw(strategy)
    if kind == "labels":
        field = draw(st.sampled_from(["podLabels", "nodeSelector", "podAnnotations"]))
        return "set", ("resources", field), draw(label_maps(marker))
    if kind == "k8s_objects":  # admitted by the schema (free-form), judged by core/v1 at the Job create
        field = draw(st.sampled_from(["tolerations", "affinity"]))
        obj = st.dictionaries(
            st.sampled_from(["key", "operator", "effect", "value", "nodeAffinity", "podAntiAffinity", "x"]),
            values(marker),
            max_size=3,
        )
        return "set", ("resources", field), draw(st.lists(obj, max_size=2) if field == "tolerations" else obj)
    if kind == "strings":  # free strings that end up in the pod spec or the trainer config
        field = draw(st.sampled_from(["image", "priorityClassName", "serviceAccountName", "cpu", "memory"]))
        return "set", ("resources", field), draw(st.one_of(st.text(max_size=80), shell_strings(marker)))
    path = draw(st.sampled_from(PATHS))
    if kind == "delete":
        return "delete", path, None
    if kind == "unknown_key":
        return (
            "set",
            (*path[:-1], draw(st.sampled_from(["bogus", "extra", "$(x)", "ü"]))),
            draw(values(marker)),
        )
    return "set", path, draw(values(marker))


@st.composite
def manifests(draw: st.DrawFn, base: dict[str, Any], marker: str) -> tuple[dict[str, Any], list[Any]]:
    """A manifest and the mutations applied to its spec (for the report)."""
    obj = copy.deepcopy(base)
    obj["metadata"]["name"] = draw(names())
    muts = draw(st.lists(mutation(marker), min_size=1, max_size=4))
    for op, path, value in muts:
        if op == "delete":
            _delete(obj["spec"], path)
        else:
            _set(obj["spec"], path, value)
    return obj, muts


def names_field(message: str) -> bool:
    """An apiserver or operator message that names the field it is about."""
    return bool(re.search(r"\b(spec(\.[A-Za-z0-9_\[\]]+)*|metadata\.name)\b", message))


def child_name_problems(kind: str, name: str) -> list[str]:
    """Services and Jobs (pod hostnames) need DNS-1123 labels."""
    return [] if DNS_LABEL.match(name) else [f"{kind} {name!r}"]
