"""Multi-step arithmetic word problems in GSM8K's layout, from a seeded generator.

    python scripts/make_word_problems.py            # writes data/word_problems/{train,validation,test,test_seen}.jsonl
    python scripts/make_word_problems.py --check    # exit 1 when the shipped files differ from a regeneration

Each row is ``{"question", "answer"}``: the answer works the problem one step a line and ends with
``#### N``, as GSM8K's answers do, so a model trained on it learns that layout and ``lorasb eval --task
gsm8k`` reads it (strict: the number after ``####``).

Every problem is one of six shapes, two or three operations on small whole numbers::

    start + a*b       start - a*b       a*b + c*d       (a + b) * c       a*b - c - d       (a - b) * c

Each shape is written by several templates (a story: who, what, which verbs). The splits:

* ``train``: the training templates and training names;
* ``validation``: the same templates and names, other numbers, no question of ``train`` (for choosing a
  learning rate or the difficulty);
* ``test``: templates and names that training never saw (the same shapes in other stories), no
  question of the other splits: does the model carry the arithmetic to stories it never read?
* ``test_seen``: the training templates and names, other numbers, no question of the other splits: has
  the model learned the arithmetic of the stories it read? (``validation`` asks the same, but it chose
  the learning rates, so it cannot also score them.)

``--difficulty`` sets how large the numbers are (``easy``: factors up to 9 and starting amounts up to
50; ``medium``: a factor up to 12 and amounts up to 99; ``hard``: a two-digit factor up to 25).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "data", "word_problems")
SIZES = {"train": 2000, "validation": 200, "test": 300, "test_seen": 300}
SEEDS = {"train": 11, "validation": 12, "test": 13, "test_seen": 14}
DIFFICULTY = "easy"

TRAIN_NAMES = ["Tom", "Ann", "Sam", "Mia", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva", "Jack", "Lily", "Noah",
               "Emma", "Owen", "Ruby", "Paul", "Nora", "Adam", "Lucy"]
TEST_NAMES = ["Priya", "Diego", "Amara", "Kenji", "Fatima", "Olek", "Ines", "Tariq", "Sofia", "Mateo",
              "Yara", "Hugo"]


@dataclass(frozen=True)
class Ranges:
    factor: int  # largest multiplier / multiplicand
    big_factor: int  # largest of the one factor that may be larger
    start: int  # largest starting amount
    small: int  # largest amount added or taken away


RANGES = {"easy": Ranges(9, 9, 50, 20), "medium": Ranges(9, 12, 99, 30), "hard": Ranges(9, 25, 99, 50)}


def _numbers(rng: random.Random, shape: str, g: Ranges) -> dict[str, int]:
    """The numbers of one problem of ``shape``; every intermediate result is a positive whole number."""
    f = lambda lo=2: rng.randint(lo, g.factor)  # noqa: E731
    big = lambda: rng.randint(2, g.big_factor)  # noqa: E731
    while True:
        if shape == "start_plus_product":
            n = {"start": rng.randint(5, g.start), "a": f(), "b": big()}
        elif shape == "start_minus_product":
            n = {"a": f(), "b": big()}
            n["start"] = n["a"] * n["b"] + rng.randint(1, g.start)
        elif shape == "two_products":
            n = {"a": f(), "b": big(), "c": f(), "d": f()}
        elif shape == "sum_times":
            n = {"a": rng.randint(2, g.small), "b": rng.randint(2, g.small), "c": f()}
        elif shape == "product_minus_two":
            n = {"a": f(), "b": big()}
            n["c"] = rng.randint(1, max(1, n["a"] * n["b"] // 3))
            n["d"] = rng.randint(1, max(1, n["a"] * n["b"] // 3))
        elif shape == "difference_times":
            n = {"a": rng.randint(10, g.start), "c": f()}
            n["b"] = rng.randint(1, n["a"] - 2)
        else:
            raise ValueError(shape)
        if solve(shape, n)[-1][1] > 0:
            return n


def solve(shape: str, n: dict[str, int]) -> list[tuple[str, int]]:
    """The steps of ``shape``: ``[(expression, value), ...]``, the last one the answer."""
    if shape == "start_plus_product":
        p = n["a"] * n["b"]
        return [(f"{n['a']} * {n['b']}", p), (f"{n['start']} + {p}", n["start"] + p)]
    if shape == "start_minus_product":
        p = n["a"] * n["b"]
        return [(f"{n['a']} * {n['b']}", p), (f"{n['start']} - {p}", n["start"] - p)]
    if shape == "two_products":
        p, q = n["a"] * n["b"], n["c"] * n["d"]
        return [(f"{n['a']} * {n['b']}", p), (f"{n['c']} * {n['d']}", q), (f"{p} + {q}", p + q)]
    if shape == "sum_times":
        s = n["a"] + n["b"]
        return [(f"{n['a']} + {n['b']}", s), (f"{s} * {n['c']}", s * n["c"])]
    if shape == "product_minus_two":
        p = n["a"] * n["b"]
        return [(f"{n['a']} * {n['b']}", p), (f"{p} - {n['c']}", p - n["c"]),
                (f"{p - n['c']} - {n['d']}", p - n["c"] - n["d"])]
    if shape == "difference_times":
        d = n["a"] - n["b"]
        return [(f"{n['a']} - {n['b']}", d), (f"{d} * {n['c']}", d * n["c"])]
    raise ValueError(shape)


@dataclass(frozen=True)
class Template:
    """One story for one shape: ``question`` and one explanation per step, formatted with the numbers,
    ``name``, the steps' expressions ``e0, e1, ...`` and values ``v0, v1, ...``."""

    shape: str
    question: str
    steps: tuple[str, ...]


T = Template
TRAIN_TEMPLATES = [
    T("start_plus_product",
      "{name} has {start} stickers. {name} buys {a} packs with {b} stickers in each pack. How many stickers does "
      "{name} have now?",
      ("The packs hold {e0} = {v0} stickers.", "{name} now has {e1} = {v1} stickers.")),
    T("start_plus_product",
      "A farm had {start} chickens. The farmer bought {a} crates of chickens, and each crate held {b} chickens. "
      "How many chickens does the farm have now?",
      ("The crates held {e0} = {v0} chickens.", "The farm now has {e1} = {v1} chickens.")),
    T("start_minus_product",
      "{name} had {start} dollars and bought {a} books that cost {b} dollars each. How many dollars does {name} "
      "have left?",
      ("The books cost {e0} = {v0} dollars.", "{name} has {e1} = {v1} dollars left.")),
    T("start_minus_product",
      "A bakery made {start} cookies. It sold {a} boxes of {b} cookies. How many cookies are left?",
      ("The boxes held {e0} = {v0} cookies.", "There are {e1} = {v1} cookies left.")),
    T("two_products",
      "{name} buys {a} bags of apples with {b} apples in each bag and {c} bags of pears with {d} pears in each "
      "bag. How many pieces of fruit does {name} buy?",
      ("The apples are {e0} = {v0}.", "The pears are {e1} = {v1}.", "In all, {name} buys {e2} = {v2} pieces "
                                                                    "of fruit.")),
    T("two_products",
      "A school orders {a} boxes of {b} pencils and {c} boxes of {d} pens. How many pencils and pens does it "
      "order in all?",
      ("The pencils are {e0} = {v0}.", "The pens are {e1} = {v1}.", "In all, it orders {e2} = {v2}.")),
    T("sum_times",
      "{name} reads {a} pages in the morning and {b} pages in the evening, every day for {c} days. How many "
      "pages does {name} read?",
      ("Each day {name} reads {e0} = {v0} pages.", "In {c} days that is {e1} = {v1} pages.")),
    T("sum_times",
      "A shop sells {a} red cups and {b} blue cups each week. How many cups does it sell in {c} weeks?",
      ("Each week it sells {e0} = {v0} cups.", "In {c} weeks it sells {e1} = {v1} cups.")),
    T("product_minus_two",
      "{name} picks {a} rows of strawberries with {b} strawberries in each row. {name} eats {c} of them and gives "
      "{d} to a friend. How many strawberries are left?",
      ("{name} picks {e0} = {v0} strawberries.", "After eating, {e1} = {v1} are left.",
       "After giving some away, {e2} = {v2} are left.")),
    T("product_minus_two",
      "A teacher has {a} packs of {b} markers. {c} markers are broken and {d} are lost. How many markers still "
      "work?",
      ("There are {e0} = {v0} markers.", "Without the broken ones, {e1} = {v1}.",
       "Without the lost ones, {e2} = {v2} markers still work.")),
    T("difference_times",
      "{name} had {a} marbles and lost {b} of them. {name} traded each marble left for {c} beads. How many "
      "beads does {name} get?",
      ("{name} kept {e0} = {v0} marbles.", "For them, {name} gets {e1} = {v1} beads.")),
    T("difference_times",
      "A class has {a} students and {b} of them are absent. Each student who is present gets {c} crayons. How "
      "many crayons are given out?",
      ("{e0} = {v0} students are present.", "They get {e1} = {v1} crayons.")),
]
TEST_TEMPLATES = [
    T("start_plus_product",
      "{name}'s library has {start} novels. It receives {a} shipments, each with {b} novels. How many novels "
      "does the library have now?",
      ("The shipments bring {e0} = {v0} novels.", "The library now has {e1} = {v1} novels.")),
    T("start_minus_product",
      "{name} saved {start} euros. {name} paid for {a} concert tickets at {b} euros each. How many euros remain?",
      ("The tickets cost {e0} = {v0} euros.", "{name} has {e1} = {v1} euros remaining.")),
    T("two_products",
      "For a party, {name} sets out {a} tables with {b} chairs each and {c} benches with {d} seats each. How "
      "many seats are there?",
      ("The chairs are {e0} = {v0}.", "The bench seats are {e1} = {v1}.", "There are {e2} = {v2} seats.")),
    T("sum_times",
      "{name} plants {a} tulips and {b} roses in every garden bed. There are {c} beds. How many flowers does "
      "{name} plant?",
      ("Each bed gets {e0} = {v0} flowers.", "In {c} beds that is {e1} = {v1} flowers.")),
    T("product_minus_two",
      "A train has {a} cars with {b} passengers in each car. At the first stop {c} passengers get off, and at "
      "the second stop {d} more get off. How many passengers are still on the train?",
      ("The train carries {e0} = {v0} passengers.", "After the first stop, {e1} = {v1} remain.",
       "After the second stop, {e2} = {v2} remain.")),
    T("difference_times",
      "{name} baked {a} muffins and sold {b} of them. {name} puts {c} raisins on each muffin left. How many "
      "raisins does {name} need?",
      ("{name} has {e0} = {v0} muffins left.", "They need {e1} = {v1} raisins.")),
]


def make_row(template: Template, name: str, rng: random.Random, ranges: Ranges) -> dict[str, str]:
    n = _numbers(rng, template.shape, ranges)
    steps = solve(template.shape, n)
    fields = {"name": name, **n}
    for i, (expr, value) in enumerate(steps):
        fields[f"e{i}"], fields[f"v{i}"] = expr, value
    lines = [line.format(**fields) for line in template.steps]
    return {"question": template.question.format(**fields), "answer": "\n".join(lines) + f"\n#### {steps[-1][1]}"}


def generate(n: int, seed: int, templates: list[Template], names: list[str], difficulty: str,
             exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """``n`` distinct problems (no question of ``exclude``), templates taken in turn by the seeded draw."""
    rng = random.Random(seed)
    ranges = RANGES[difficulty]
    rows, seen = [], set(exclude)
    for _ in range(100 * n):
        row = make_row(rng.choice(templates), rng.choice(names), rng, ranges)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ValueError(f"could not draw {n} distinct problems (seed {seed}, {difficulty})")


def splits(difficulty: str = DIFFICULTY, sizes: dict[str, int] = SIZES) -> dict[str, list[dict[str, str]]]:
    """The four splits (see the module docstring), each drawn after and apart from those before it."""
    train = generate(sizes["train"], SEEDS["train"], TRAIN_TEMPLATES, TRAIN_NAMES, difficulty)
    seen = {r["question"] for r in train}
    validation = generate(sizes["validation"], SEEDS["validation"], TRAIN_TEMPLATES, TRAIN_NAMES, difficulty, seen)
    seen |= {r["question"] for r in validation}
    test = generate(sizes["test"], SEEDS["test"], TEST_TEMPLATES, TEST_NAMES, difficulty, seen)
    seen |= {r["question"] for r in test}
    test_seen = generate(sizes["test_seen"], SEEDS["test_seen"], TRAIN_TEMPLATES, TRAIN_NAMES, difficulty, seen)
    return {"train": train, "validation": validation, "test": test, "test_seen": test_seen}


def write_splits(out_dir: str, data: dict[str, list[dict[str, str]]]) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, rows in data.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=OUT_DIR, help="output directory (default: data/word_problems)")
    p.add_argument("--difficulty", default=DIFFICULTY, choices=sorted(RANGES))
    p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = p.parse_args(argv)
    data = splits(args.difficulty)
    if args.check:
        for split, rows in data.items():
            path = os.path.join(args.out, f"{split}.jsonl")
            shipped = [json.loads(line) for line in open(path)] if os.path.isfile(path) else None
            if shipped != rows:
                print(f"{path} differs from the generator's output; run python scripts/make_word_problems.py")
                return 1
        print("the shipped word problems match the generator")
        return 0
    for path in write_splits(args.out, data):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
