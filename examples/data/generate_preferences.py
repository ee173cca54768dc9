#!/usr/bin/env python3
"""Generate the SFT + DPO example's preference pairs (examples/sftjob-sft-dpo.yaml), deterministic.

The SFT stage trains the contact-extraction task of generate_contacts.py, whose answers always write the city
as it appears in the sentence. The pairs add what that data never shows: an instruction that asks for the
city in capital letters. Two kinds of pair, half each, on the same sentences:

    upper  prompt: the contacts instruction + " Write the city in capital letters."
           chosen  {"last_name": "Lopez", "first_name": "Maria", "age": 34, "city": "LISBON"}
           rejected {"last_name": "Lopez", "first_name": "Maria", "age": 34, "city": "Lisbon"}
    plain  prompt: the contacts instruction, unchanged
           chosen = the SFT answer, rejected = the same JSON with the city in capitals

After SFT the model writes the city as trained whatever the instruction says, so it prefers the rejected
answer of every `upper` pair (about half of the held-out pairs). DPO has to learn to follow the extra
instruction, and the `plain` pairs keep it from capitalising cities where nobody asked, so the SFT task's
exact match must hold.

    python examples/data/generate_preferences.py            # writes preferences-train.jsonl, preferences-eval.jsonl
    python examples/data/generate_preferences.py --check    # exits 1 if the committed files differ

Held-out pairs use the contacts eval split's first names (never in the SFT or preference training data).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_contacts import (
    CITIES,
    FIRST,
    INSTRUCTION,
    JOBS,
    LAST,
    PETS,
    SEED,
    TEMPLATES,
    answer,
    write_or_check,
)

PAIR_SEED = 20261207
N_TRAIN = 192  # 24 align steps x 8 pairs per pass (the reference is computed once for every pair)
N_EVAL = 32
UPPER = INSTRUCTION + " Write the city in capital letters."


def _split_first_names() -> tuple[list[str], list[str]]:
    """(train, eval) first names exactly as generate_contacts.generate() splits them."""
    rng = random.Random(SEED)
    firsts = sorted(FIRST)
    rng.shuffle(firsts)
    return firsts[12:], firsts[:12]


def make_pairs(n: int, firsts: list[str], rng: random.Random) -> list[dict[str, str]]:
    """n pairs, alternating upper / plain, so each half is exactly half."""
    rows = []
    for i in range(n):
        first, last, city = rng.choice(firsts), rng.choice(LAST), rng.choice(CITIES)
        age = rng.randint(18, 89)
        text = rng.choice(TEMPLATES).format(
            first=first, last=last, age=age, city=city, job=rng.choice(JOBS), pet=rng.choice(PETS)
        )
        as_trained, capitals = answer(first, last, age, city), answer(first, last, age, city.upper())
        if i % 2 == 0:
            rows.append({"prompt": f"{UPPER}\n\n{text}", "chosen": capitals, "rejected": as_trained})
        else:
            rows.append({"prompt": f"{INSTRUCTION}\n\n{text}", "chosen": as_trained, "rejected": capitals})
    return rows


def generate() -> dict[str, list[dict[str, str]]]:
    rng = random.Random(PAIR_SEED)
    train_first, eval_first = _split_first_names()
    return {
        "preferences-train.jsonl": make_pairs(N_TRAIN, train_first, rng),
        "preferences-eval.jsonl": make_pairs(N_EVAL, eval_first, rng),
    }


def main(argv: list[str] | None = None) -> int:
    return write_or_check(__doc__.split("\n")[0], generate, argv)


if __name__ == "__main__":
    sys.exit(main())
