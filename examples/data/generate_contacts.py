#!/usr/bin/env python3
"""Generate the shipped example dataset: contact extraction into a fixed JSON shape (deterministic).

Each row is alpaca-style: an instruction, an input sentence about a person (varied phrasing, with
distractors such as job and pet), and the one correct output, e.g.

    input : "Meet Maria Lopez, a 34-year-old nurse from Lisbon."
    output: {"last_name": "Lopez", "first_name": "Maria", "age": 34, "city": "Lisbon"}

The answer is fully checkable (exact match after normalisation), the key order and the last-name-first
layout are arbitrary choices a base model cannot guess, and the skill (copying and reordering spans) is
learnable by a small model in a few hundred optimizer steps.

    python examples/data/generate_contacts.py            # writes contacts-train.jsonl, contacts-eval.jsonl
    python examples/data/generate_contacts.py --check    # exits 1 if the committed files differ

Train and eval use disjoint first names, so eval measures generalisation, not memorisation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261125
N_TRAIN = 3000
N_EVAL = 48

INSTRUCTION = "Reply with JSON only: last_name, first_name, age, city."

FIRST = [
    "Maria",
    "James",
    "Aisha",
    "Chen",
    "Lukas",
    "Sofia",
    "Mateo",
    "Priya",
    "Olga",
    "Kwame",
    "Emma",
    "Hiroshi",
    "Fatima",
    "Noah",
    "Ingrid",
    "Diego",
    "Amara",
    "Tomasz",
    "Yara",
    "Oliver",
    "Leila",
    "Ravi",
    "Hannah",
    "Santiago",
    "Mei",
    "Erik",
    "Zainab",
    "Lucas",
    "Anya",
    "Kofi",
    "Clara",
    "Arjun",
    "Elena",
    "Jonas",
    "Nadia",
    "Pedro",
    "Freya",
    "Omar",
    "Julia",
    "Sven",
    "Lina",
    "Marco",
    "Keiko",
    "Samuel",
    "Irene",
    "Tariq",
    "Greta",
    "Felix",
    "Rosa",
    "Daniel",
    "Ava",
    "Ivan",
    "Nora",
    "Hugo",
    "Sara",
    "Leo",
    "Alice",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Eva",
    "Farid",
    "Gloria",
    "Hassan",
    "Isla",
    "Jorge",
    "Kira",
    "Luis",
    "Maya",
    "Nils",
    "Paula",
    "Quentin",
    "Rita",
    "Stefan",
    "Tara",
    "Uma",
    "Victor",
    "Wanda",
]
LAST = [
    "Lopez",
    "Smith",
    "Okafor",
    "Wang",
    "Muller",
    "Rossi",
    "Garcia",
    "Sharma",
    "Ivanova",
    "Mensah",
    "Dubois",
    "Tanaka",
    "Haddad",
    "Johnson",
    "Larsen",
    "Fernandez",
    "Nwosu",
    "Kowalski",
    "Costa",
    "Brown",
    "Karimi",
    "Patel",
    "Schmidt",
    "Herrera",
    "Li",
    "Andersson",
    "Bello",
    "Silva",
    "Petrova",
    "Boateng",
    "Martin",
    "Iyer",
    "Popescu",
    "Weber",
    "Rahman",
    "Santos",
    "Nielsen",
    "Aziz",
    "Novak",
    "Berg",
    "Moreau",
    "Bianchi",
    "Sato",
    "Cohen",
    "Ricci",
    "Qureshi",
    "Fischer",
    "Wagner",
    "Romero",
    "Kim",
    "Nguyen",
    "Jensen",
    "Horvat",
    "Lindqvist",
    "Mendes",
    "Park",
    "Yilmaz",
    "Olsen",
    "Meyer",
]
CITIES = [
    "Lisbon",
    "Boston",
    "Lagos",
    "Shanghai",
    "Berlin",
    "Rome",
    "Madrid",
    "Mumbai",
    "Moscow",
    "Accra",
    "Paris",
    "Osaka",
    "Beirut",
    "Chicago",
    "Oslo",
    "Seville",
    "Nairobi",
    "Warsaw",
    "Porto",
    "Leeds",
    "Tehran",
    "Delhi",
    "Hamburg",
    "Bogota",
    "Taipei",
    "Stockholm",
    "Abuja",
    "Recife",
    "Kyiv",
    "Kumasi",
    "Lyon",
    "Chennai",
    "Bucharest",
    "Vienna",
    "Dhaka",
    "Manila",
    "Copenhagen",
    "Cairo",
    "Prague",
    "Bergen",
    "Marseille",
    "Milan",
    "Kyoto",
    "Haifa",
    "Naples",
    "Karachi",
    "Munich",
    "Zurich",
    "Lima",
    "Seoul",
    "Hanoi",
    "Aarhus",
    "Zagreb",
    "Uppsala",
    "Braga",
    "Busan",
    "Izmir",
    "Tromso",
    "Dresden",
]
JOBS = [
    "nurse",
    "teacher",
    "carpenter",
    "software engineer",
    "chef",
    "pilot",
    "librarian",
    "painter",
    "accountant",
    "farmer",
    "dentist",
    "journalist",
    "plumber",
    "architect",
    "baker",
    "musician",
]
PETS = ["a cat", "two dogs", "a parrot", "no pets", "a rabbit", "three goldfish", "a tortoise"]

TEMPLATES = [
    "Meet {first} {last}, a {age}-year-old {job} from {city}.",
    "{first} {last} is {age} years old and lives in {city}.",
    "Name: {first} {last}; Age: {age}; City: {city}; Occupation: {job}.",
    "{last}, {first} ({age}) - {job}, based in {city}.",
    "Our new {job}, {first} {last}, just moved to {city}. {first} is {age}.",
    "Born {age} years ago, {first} {last} now works as a {job} in {city} and has {pet}.",
    "Customer record: {first} {last}, age {age}, city of residence {city}.",
    "In {city} lives {first} {last}, who is {age} and keeps {pet}.",
    "{first} {last} ({job}, {age}) will present at the {city} meetup.",
    "Please update the file for {first} {last}: now {age}, relocated to {city}.",
    "Hi, I'm {first} {last}, a {job} from {city}, and I turned {age} last week.",
    "Age {age}. City {city}. Full name {first} {last}. Has {pet}.",
]


def answer(first: str, last: str, age: int, city: str) -> str:
    return json.dumps({"last_name": last, "first_name": first, "age": age, "city": city})


def make_rows(n: int, firsts: list[str], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        first, last, city = rng.choice(firsts), rng.choice(LAST), rng.choice(CITIES)
        age = rng.randint(18, 89)
        text = rng.choice(TEMPLATES).format(
            first=first, last=last, age=age, city=city, job=rng.choice(JOBS), pet=rng.choice(PETS)
        )
        rows.append({"instruction": INSTRUCTION, "input": text, "output": answer(first, last, age, city)})
    return rows


def generate() -> dict[str, list[dict[str, str]]]:
    rng = random.Random(SEED)
    firsts = sorted(FIRST)
    rng.shuffle(firsts)
    eval_first = firsts[:12]  # first names never seen in training
    train_first = firsts[12:]
    return {
        "contacts-train.jsonl": make_rows(N_TRAIN, train_first, rng),
        "contacts-eval.jsonl": make_rows(N_EVAL, eval_first, rng),
    }


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_or_check(
    description: str, files: Callable[[], dict[str, list[dict[str, str]]]], argv: list[str] | None
) -> int:
    """The generators' command line: write the files into --out, or with --check say whether they match."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=HERE, help="output directory (default: next to this script)")
    ap.add_argument("--check", action="store_true", help="verify the files in --out instead of writing")
    args = ap.parse_args(argv)
    bad = 0
    for name, rows in files().items():
        path = os.path.join(args.out, name)
        text = render(rows)
        if args.check:
            ok = False
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    ok = f.read() == text
            print(f"{path}: {'ok' if ok else 'DIFFERS'}")
            bad += not ok
        else:
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path} ({len(rows)} rows)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    return write_or_check(__doc__.split("\n")[0], generate, argv)


if __name__ == "__main__":
    sys.exit(main())
