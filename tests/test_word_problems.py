"""The word problems of the quality study (scripts/make_word_problems.py): shipped files equal the
generator's output, answers are right, and the test split shares no template, name or question with
training."""

import json
import os
import re
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import make_word_problems as wp  # noqa: E402

from lorasb_ds.scoring import extract_strict, gsm8k_gold  # noqa: E402


def shipped(split):
    with open(os.path.join(wp.OUT_DIR, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_shipped_files_are_the_generators_output():
    assert wp.main(["--check"]) == 0
    assert {s: len(shipped(s)) for s in wp.SIZES} == wp.SIZES


def test_every_answer_works_its_steps_and_ends_with_the_right_number():
    for split in wp.SIZES:
        for row in shipped(split):
            lines = row["answer"].split("\n")
            assert lines[-1].startswith("#### ") and len(lines) >= 3
            for line in lines[:-1]:  # "... a op b = c ..." with c right
                [(a, op, b, c)] = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", line)
                assert eval(f"{a} {op} {b}") == int(c), line
            last = int(re.findall(r"= (\d+)", lines[-2])[0])
            assert gsm8k_gold(row["answer"]) == last > 0
            assert extract_strict(row["answer"]) == last  # strict scoring reads what training teaches


def test_test_split_is_unseen_templates_names_and_questions():
    train_q = {r["question"] for r in shipped("train")}
    val_q = {r["question"] for r in shipped("validation")}
    test = shipped("test")
    assert not train_q & val_q and not (train_q | val_q) & {r["question"] for r in test}
    assert not set(wp.TRAIN_NAMES) & set(wp.TEST_NAMES)
    assert not {t.question for t in wp.TRAIN_TEMPLATES} & {t.question for t in wp.TEST_TEMPLATES}
    for row in test:
        assert not any(re.search(rf"\b{n}\b", row["question"]) for n in wp.TRAIN_NAMES), row["question"]
    # every shape is tested, and training has every shape too
    assert {t.shape for t in wp.TEST_TEMPLATES} == {t.shape for t in wp.TRAIN_TEMPLATES}


def story(template) -> re.Pattern:
    """A template's question as a pattern: its words, a name where it says {name}, numbers elsewhere."""
    pattern, named = "", False
    for i, part in enumerate(re.split(r"\{(\w+)\}", template.question)):
        if i % 2 == 0:
            pattern += re.escape(part)
        elif part == "name":
            pattern += "(?P=name)" if named else "(?P<name>\\w+)"
            named = True
        else:
            pattern += "\\d+"
    return re.compile(pattern)


def test_test_seen_split_is_training_stories_with_unseen_questions():
    others = {r["question"] for split in ("train", "validation", "test") for r in shipped(split)}
    rows = shipped("test_seen")
    assert not others & {r["question"] for r in rows} and len({r["question"] for r in rows}) == len(rows)
    used = set()
    for row in rows:  # each question is a training story told of a training name
        [(i, match)] = [(i, m) for i, t in enumerate(wp.TRAIN_TEMPLATES) if (m := story(t).fullmatch(row["question"]))]
        assert match.groupdict().get("name") in (None, *wp.TRAIN_NAMES), row["question"]
        assert not any(story(t).fullmatch(row["question"]) for t in wp.TEST_TEMPLATES)
        used.add(i)
    assert used == set(range(len(wp.TRAIN_TEMPLATES)))


def test_difficulty_sets_the_sizes_of_the_numbers():
    easy = wp.generate(200, 5, wp.TRAIN_TEMPLATES, wp.TRAIN_NAMES, "easy")
    hard = wp.generate(200, 5, wp.TRAIN_TEMPLATES, wp.TRAIN_NAMES, "hard")
    factors = lambda rows: max(int(b) for r in rows for b in re.findall(r"\d+ \* (\d+)", r["answer"]))  # noqa: E731
    assert factors(easy) <= 9 < factors(hard) <= 25
