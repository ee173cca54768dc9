#!/usr/bin/env python3
"""Generate the curated-mixture example's three sources (examples/sftjob-curated-mixture.yaml), deterministic.

The contact-extraction task of generate_contacts.py, split into three sources of different style, each with
planted problems that curation must catch (docs/data.md):

    mixture-general.jsonl  varied phrasings            + near-duplicates + verbatim eval leaks
    mixture-formal.jsonl   record-style phrasings      + near-duplicates
    mixture-hard.jsonl     long, distractor-heavy text + eval leaks wrapped in other text

Near-duplicates are rows copied with other casing, punctuation or whitespace: exact-duplicate removal misses
them, near-duplicate removal (which compares lower-cased words) does not. Eval leaks are rows of
contacts-eval.jsonl, verbatim or wrapped in other text. `planted()` says which lines are which (the pipeline test uses it).

    python examples/data/generate_mixture.py            # writes the three files next to this script
    python examples/data/generate_mixture.py --check    # exits 1 if the committed files differ
"""

from __future__ import annotations

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate_contacts import (  # noqa: E402
    CITIES,
    JOBS,
    LAST,
    PETS,
    TEMPLATES,
    answer,
    generate,
    write_or_check,
)

SEED = 20261201
FORMAL = [t for t in TEMPLATES if t.startswith(("Name:", "Customer record", "Age ", "Please update"))]
HARD = [
    "Forwarded note from the front desk, sorry for the mess: {first} {last}, who used to be a {job} and has "
    "{pet}, is {age} now, and after many moves finally settled in {city} last spring.",
    "Not to be confused with the {job} of the same street: {last}, {first}; {age}; home town {city}; has {pet}.",
    "Two visitors today. The first left no name. The second, {first} {last} ({age}), a {job} from {city}, "
    "signed the book and mentioned {pet}.",
]
SIZES = {"general": 240, "formal": 150, "hard": 60}
TEMPLATE_SETS = {"general": TEMPLATES, "formal": FORMAL, "hard": HARD}
N_NEAR = {"general": 12, "formal": 6, "hard": 0}
N_LEAK = {"general": 6, "formal": 0, "hard": 3}


def _rows(n: int, templates: list[str], firsts: list[str], rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        first, last, city = rng.choice(firsts), rng.choice(LAST), rng.choice(CITIES)
        age = rng.randint(18, 89)
        text = rng.choice(templates).format(
            first=first, last=last, age=age, city=city, job=rng.choice(JOBS), pet=rng.choice(PETS)
        )
        out.append(
            {"instruction": generate_instruction(), "input": text, "output": answer(first, last, age, city)}
        )
    return out


def generate_instruction() -> str:
    return "Reply with JSON only: last_name, first_name, age, city."


def _near(row: dict[str, str], k: int) -> dict[str, str]:
    text = row["input"]
    variants = [
        text.upper(),
        text.replace(",", " ,").replace(".", " ."),
        "  " + text + "  ",
        text.rstrip(".") + "!",
    ]
    return {**row, "input": variants[k % len(variants)]}


def build() -> tuple[dict[str, list[dict[str, str]]], dict[str, dict[str, list[int]]]]:
    """(file name -> rows, source -> {"near": [1-based lines], "leak": [...]}), deterministic."""
    contacts = generate()
    evals = contacts["contacts-eval.jsonl"]
    eval_first = {json.loads(r["output"])["first_name"] for r in evals}
    firsts = sorted(
        {json.loads(r["output"])["first_name"] for r in contacts["contacts-train.jsonl"]} - eval_first
    )
    rng = random.Random(SEED)
    files, marks = {}, {}
    leak_rows = iter(rng.sample(range(len(evals)), sum(N_LEAK.values())))
    for source, n in SIZES.items():
        rows = _rows(n, TEMPLATE_SETS[source], firsts, rng)
        marks[source] = {"near": [], "leak": []}
        planted: list[tuple[str, dict[str, str]]] = []
        for k, i in enumerate(rng.sample(range(n), N_NEAR[source])):
            planted.append(("near", _near(rows[i], k)))
        for _ in range(N_LEAK[source]):
            ev = dict(evals[next(leak_rows)])
            if source == "hard":
                ev["input"] = "Copied from the shared sheet: " + ev["input"]
            planted.append(("leak", ev))
        for kind, row in planted:  # near-duplicates after their original, leaks anywhere
            at = rng.randint(n // 2, len(rows)) if kind == "near" else rng.randint(0, len(rows))
            rows.insert(at, row)
        for line, row in enumerate(rows, start=1):
            for kind, p in planted:
                if row is p:
                    marks[source][kind].append(line)
        files[f"mixture-{source}.jsonl"] = rows
    return files, marks


def planted() -> dict[str, dict[str, list[int]]]:
    return build()[1]


def main(argv: list[str] | None = None) -> int:
    return write_or_check(__doc__.split("\n")[0], lambda: build()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
