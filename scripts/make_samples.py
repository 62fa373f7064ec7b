#!/usr/bin/env python
"""Write the small sample data sets of ``data/samples/``, one per data format, plus GSM8K-style test rows.

Every row is generated here from fixed seeds (no real data set is copied), so running the script
again gives byte-identical files; ``tests/test_data.py`` checks that the shipped files match. The
rows follow the layouts of the real data sets, so a run on a sample exercises the same code as a run
on the real thing:

=====================  ============================================  ==========================
file                   columns                                       real counterpart
=====================  ============================================  ==========================
metamath.jsonl         query, response, type, original_question      MetaMathQA
alpaca.jsonl           instruction, input, output                    Alpaca-style instructions
commonsense.json       instruction, input, output, answer (a list)   LLM-Adapters commonsense_170k
chat.jsonl             messages: [{role, content}, ...]              chat / instruct conversations
gsm8k_test.jsonl       question, answer ("#### N" last line)         GSM8K test split
glue_sst2.jsonl        sentence, label (0/1), idx                    GLUE SST-2
glue_mrpc.jsonl        sentence1, sentence2, label (0/1), idx        GLUE MRPC
glue_stsb.jsonl        sentence1, sentence2, label (0.0-5.0), idx    GLUE STS-B
=====================  ============================================  ==========================

Usage: ``python scripts/make_samples.py [--out DIR]`` (default: ``data/samples`` of this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import random

ROWS = 40  # per file: enough for a short run with est_samples <= 40, a few KB each

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Elif", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Luca",
         "Maya", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]


# --------------------------------------------------------------------------- metamath

# Word problems whose answer is a*b + sign*c. "stmt" states the outcome (for the "unknown variable"
# rows); every wording takes the first quantity as {a}, which those rows replace by x.
STORIES = [
    {"sign": -1, "noun": "muffins",
     "q": "A bakery bakes {a} trays of muffins with {b} on each tray and sells {c} muffins. "
          "How many muffins are left?",
     "rq": "If a bakery sells {c} of the muffins from {a} trays holding {b} each, how many are left?",
     "stmt": "A bakery bakes {a} trays of muffins with {b} on each tray, sells {c} muffins and has "
             "{ans} left.",
     "sol": "The bakery bakes {a} * {b} = {ab} muffins.\nAfter selling {c}, {ab} - {c} = {ans} are left."},
    {"sign": -1, "noun": "dollars",
     "q": "{name} saves ${b} a week for {a} weeks and then spends ${c} on a lamp. How many dollars "
          "are left?",
     "rq": "After saving ${b} weekly for {a} weeks, {name} buys a ${c} lamp. How much money is left?",
     "stmt": "{name} saves ${b} a week for {a} weeks, spends ${c} on a lamp and has ${ans} left.",
     "sol": "{name} saves {a} * {b} = ${ab}.\nAfter the lamp, {ab} - {c} = ${ans} is left."},
    {"sign": 1, "noun": "tulips",
     "q": "A garden has {a} rows of {b} tulips, and {c} more tulips are planted. How many tulips "
          "are there now?",
     "rq": "How many tulips does a garden hold after {c} are added to {a} rows of {b} tulips?",
     "stmt": "A garden has {a} rows of {b} tulips; after {c} more are planted it has {ans} tulips.",
     "sol": "The rows hold {a} * {b} = {ab} tulips.\nWith the new ones, {ab} + {c} = {ans} tulips."},
    {"sign": 1, "noun": "passengers",
     "q": "A bus makes {a} trips with {b} passengers each, plus a special trip with {c} "
          "passengers. How many passengers does it carry?",
     "rq": "If a bus carries {b} people on each of {a} trips and {c} on one more, how many in all?",
     "stmt": "A bus makes {a} trips with {b} passengers each and one with {c}, carrying {ans} in all.",
     "sol": "The regular trips carry {a} * {b} = {ab} passengers.\nIn all, {ab} + {c} = {ans} passengers."},
    {"sign": -1, "noun": "books",
     "q": "A library has {a} shelves of {b} books, and students borrow {c} books. How many books "
          "are still on the shelves?",
     "rq": "Students borrow {c} books from {a} shelves of {b} books. How many books stay?",
     "stmt": "A library has {a} shelves of {b} books; after students borrow {c}, {ans} are left.",
     "sol": "The shelves hold {a} * {b} = {ab} books.\nAfter the loans, {ab} - {c} = {ans} remain."},
]


def _story_numbers(rng: random.Random, story: dict) -> dict:
    a, b = rng.randint(3, 12), rng.randint(4, 15)
    c = rng.randint(1, a * b - 1) if story["sign"] < 0 else rng.randint(2, 40)
    ab = a * b
    return {"a": a, "b": b, "c": c, "ab": ab, "ans": ab + story["sign"] * c, "name": rng.choice(NAMES)}


def _solve_for_x(v: dict, sign: int) -> str:
    op = "-" if sign < 0 else "+"
    undo = (f"Adding {v['c']} to both sides" if sign < 0 else f"Subtracting {v['c']} from both sides")
    rhs = v["ans"] - sign * v["c"]
    return (f"From the problem, x * {v['b']} {op} {v['c']} = {v['ans']}.\n"
            f"{undo} gives x * {v['b']} = {rhs}.\nDividing by {v['b']} gives x = {v['a']}.\n"
            f"The value of x is {v['a']}.\nThe answer is: {v['a']}")


def metamath_rows(n: int = ROWS, seed: int = 101) -> list[dict]:
    """MetaMathQA-style rows; the ``type`` cycles through its five augmentation kinds."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = ["GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR", "MATH_AnsAug"][i % 5]
        if kind == "MATH_AnsAug":
            x, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, 30)
            query = f"Solve for $x$: ${b}x + {c} = {b * x + c}$."
            response = (f"Subtracting {c} from both sides gives ${b}x = {b * x}$.\n"
                        f"Dividing both sides by {b} gives $x = \\boxed{{{x}}}$.\nThe answer is: {x}")
            rows.append({"query": query, "response": response, "type": kind, "original_question": query})
            continue
        story = rng.choice(STORIES)
        v = _story_numbers(rng, story)
        original = story["q"].format(**v)
        with_x = dict(v, a="x")
        if kind == "GSM_AnsAug":
            query = original
        elif kind == "GSM_Rephrased":
            query = story["rq"].format(**v)
        elif kind == "GSM_SV":
            query = story["stmt"].format(**with_x) + " What is the value of unknown variable x?"
        else:  # GSM_FOBAR: the question with x, and its answer given
            query = (story["q"].format(**with_x) + f"\nIf we know the answer to the above question is "
                     f"{v['ans']}, what is the value of unknown variable x?")
        if kind in ("GSM_AnsAug", "GSM_Rephrased"):
            response = story["sol"].format(**v) + f"\n#### {v['ans']}\nThe answer is: {v['ans']}"
        else:
            response = _solve_for_x(v, story["sign"])
        rows.append({"query": query, "response": response, "type": kind, "original_question": original})
    return rows


# --------------------------------------------------------------------------- alpaca

ADJECTIVES = ["red", "small", "quiet", "happy", "old", "bright", "lazy", "brave"]
NOUNS = ["fox", "cat", "robot", "bird", "child", "horse", "dog", "farmer"]
VERBS = ["runs", "sings", "waits", "jumps", "sleeps", "walks", "reads", "dances"]
PLACES = ["at home", "in the park", "by the river", "near the gate", "on the hill", "in the rain"]
WORDS = ["banana", "garden", "window", "pencil", "orange", "tiger", "umbrella", "rocket", "island",
         "kitchen", "planet", "guitar", "elephant", "castle", "mirror", "balloon"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _numbers(rng: random.Random, k: int) -> list[int]:
    return rng.sample(range(1, 60), k)


def _alpaca_task(kind: int, rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, output) of one of ten small tasks; the first six have an input."""
    if kind == 0:
        xs = _numbers(rng, 5)
        return ("Sort the following numbers in ascending order.", ", ".join(map(str, xs)),
                ", ".join(map(str, sorted(xs))))
    if kind == 1:
        words = [rng.choice(["the", "a"]), rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS),
                 *rng.choice(PLACES).split()]
        return ("Reverse the order of the words in the sentence.", " ".join(words),
                " ".join(reversed(words)))
    if kind == 2:
        w = rng.choice(WORDS)
        k = sum(ch in "aeiou" for ch in w)
        return ("Count the vowels in the given word.", w,
                f"The word \"{w}\" has {k} vowel{'s' if k != 1 else ''}.")
    if kind == 3:
        c = rng.randrange(-20, 45, 5)
        return ("Convert the temperature from Celsius to Fahrenheit.", f"{c} degrees Celsius",
                f"{c} degrees Celsius is {c * 9 // 5 + 32} degrees Fahrenheit.")
    if kind == 4:
        x = rng.randint(1, 999)
        return ("Say whether the number is even or odd.", str(x),
                f"{x} is an {'even' if x % 2 == 0 else 'odd'} number.")
    if kind == 5:
        xs = _numbers(rng, 6)
        return ("Find the largest number in the list.", ", ".join(map(str, xs)),
                f"The largest number is {max(xs)}.")
    if kind == 6:
        a, b = rng.randint(10, 500), rng.randint(10, 500)
        return (f"What is the sum of {a} and {b}?", "", f"The sum of {a} and {b} is {a + b}.")
    if kind == 7:
        k, m = rng.randint(2, 12), rng.randint(3, 6)
        return (f"List the first {m} multiples of {k}.", "",
                ", ".join(str(k * j) for j in range(1, m + 1)))
    if kind == 8:
        x = rng.randint(0, 20)
        return (f"Write the number {x} in words.", "", NUMBER_WORDS[x])
    start, k = rng.randrange(7), rng.randint(1, 12)
    return (f"Which day of the week comes {k} days after {DAYS[start]}?", "",
            f"{k} days after {DAYS[start]} comes {DAYS[(start + k) % 7]}.")


def alpaca_rows(n: int = ROWS, seed: int = 202) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction, input_text, output = _alpaca_task(i % 10, rng)
        rows.append({"instruction": instruction, "input": input_text, "output": output})
    return rows


# --------------------------------------------------------------------------- commonsense (LLM-Adapters layout)

GOALS = [  # (goal, the sensible way, the silly way)
    ("keep cut apples from turning brown", "brush the slices with lemon juice",
     "leave the slices in the sun"),
    ("dry a wet phone screen", "wipe it with a soft cloth", "rinse it under the tap"),
    ("loosen a tight jar lid", "hold the lid under warm water", "put the jar in the freezer"),
    ("stop a door from squeaking", "put a drop of oil on the hinges", "paint the door handle"),
    ("keep bread fresh for longer", "store it in a closed bag", "leave it uncovered on the counter"),
    ("find a small bead dropped on a carpet", "shine a torch low across the floor",
     "turn off all the lights"),
    ("cool a hot drink quickly", "pour it into a wide, cold mug", "cover it with a thick lid"),
    ("carry soup to work without spilling it", "pour it into a jar with a screw lid",
     "carry it in an open bowl"),
]

BLANKS = [  # (sentence with {A}, {B} and a blank _, which of A/B fills the blank)
    ("{A} lent {B} an umbrella because _ was about to walk home in the rain.", "B"),
    ("{A} asked {B} to explain the homework because _ was good at fractions.", "B"),
    ("{A} thanked {B} for the present because _ had wanted one for months.", "A"),
    ("{A} could not reach the top shelf, so {B} got the box down, since _ was taller.", "B"),
    ("{A} was tired after the race while {B} was not, so _ sat down to rest.", "A"),
    ("{A} cooked dinner for {B} because _ came home late from work.", "B"),
    ("{A} apologised to {B} because _ had broken the vase.", "A"),
    ("{A} lost the chess game to {B}, so _ congratulated the winner.", "A"),
]

QUESTIONS = [  # (question, correct answer, wrong answers)
    ("Which of these gives off its own light?", "the sun", ["the moon", "a mirror", "a window", "a rock"]),
    ("Water turns into ice when it is", "cooled below freezing",
     ["heated", "stirred", "poured out", "shaken"]),
    ("Which object is pulled by a magnet?", "an iron nail",
     ["a wooden spoon", "a glass cup", "a rubber ball", "a cotton shirt"]),
    ("Sam shared his lunch with a friend who had forgotten hers. How would the friend feel?",
     "grateful", ["angry", "bored", "scared", "jealous"]),
    ("Why do people wear coats in winter?", "to stay warm",
     ["to stay wet", "to run faster", "to see better", "to feel hungry"]),
    ("Which animal lays eggs?", "a hen", ["a cow", "a dog", "a horse", "a goat"]),
    ("What happens to a puddle on a hot, sunny day?", "it dries up",
     ["it freezes", "it grows", "it turns to sand", "it becomes salty"]),
    ("Nina studied every evening before her exam. What is she likely to do next?",
     "feel ready for the exam", ["forget the exam date", "skip the exam", "lose her books",
                                 "change schools"]),
]

ENDINGS = [  # (context, sensible ending, silly endings)
    ("A woman fills a kettle with water. She", "switches it on and waits for it to boil.",
     ["throws the kettle into the garden.", "reads the kettle a story.", "paints the water blue."]),
    ("A boy laces up his skates at the rink. He", "steps onto the ice and glides forward.",
     ["plants seeds in the ice.", "folds the skates into a paper plane.", "eats the laces for lunch."]),
    ("A man leans a ladder against the house. He", "climbs up carefully to clean the gutter.",
     ["bakes the ladder in the oven.", "asks the ladder for directions.", "swims across the lawn."]),
    ("A girl opens her umbrella as rain starts to fall. She", "keeps walking while the rain runs off it.",
     ["hangs it in the bath to dry the rain.", "sells the rain to a neighbour.", "turns into a cloud."]),
    ("A cook cracks two eggs into a bowl. He", "beats them with a fork.",
     ["puts the bowl on his head.", "mails the eggs to a friend.", "plays the bowl like a drum all day."]),
    ("A dog sees its owner pick up the leash. It", "runs to the door wagging its tail.",
     ["starts to read the newspaper.", "hides the leash in the fridge.", "drives to the shop."]),
    ("A student sharpens her pencil before the test. She", "writes her name at the top of the page.",
     ["eats the eraser.", "throws the test out of the window.", "sharpens the desk."]),
    ("A gardener notices that the soil is dry. He", "waters the plants with a hose.",
     ["covers the plants with sand.", "paints the soil green.", "sings to the hose until it rains."]),
]


def _choices(rng: random.Random, right: str, wrong: list[str], k: int) -> tuple[list[str], int]:
    """``k`` options: the right one and k-1 wrong ones, shuffled; also the right one's 1-based place."""
    options = [right] + rng.sample(wrong, k - 1)
    rng.shuffle(options)
    return options, options.index(right) + 1


def _listing(label: str, options: list[str]) -> str:
    return "\n\n".join(f"{label}{j}: {o}" for j, o in enumerate(options, 1))


def _true_false(rng: random.Random, j: int) -> tuple[str, str]:
    """A checkable yes/no question; the answers alternate true, false, true, ..."""
    want = j % 2 == 0
    kind = (j // 2) % 4
    if kind == 0:
        x = 2 * rng.randint(1, 49) + (0 if want else 1)
        question = f"is {x} an even number?"
    elif kind == 1:
        a, b = sorted(rng.sample(range(1, 100), 2), reverse=want)
        question = f"is {a} greater than {b}?"
    elif kind == 2:
        month = rng.choice(["January", "July", "October", "December"] if want
                           else ["February", "April", "June", "September"])
        question = f"does {month} have 31 days in a common year?"
    else:
        w = rng.choice(WORDS)
        k = len(w) if want else len(w) + rng.choice([-2, -1, 1, 2])
        question = f"does the word \"{w}\" have {k} letters?"
    return question, "true" if want else "false"


def commonsense_rows(n: int = ROWS, seed: int = 303) -> list[dict]:
    """The five answer styles of commonsense_170k in turn: true/false, solution, option, answer, ending."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind, j = i % 5, i // 5
        if kind == 0:
            question, answer = _true_false(rng, j)
            instruction = (f"Answer the question with true or false.\n\nQuestion: {question}\n\n"
                           "Answer format: true/false")
        elif kind == 1:
            goal, good, bad = GOALS[j % len(GOALS)]
            options, right = _choices(rng, good, [bad], 2)
            instruction = (f"Choose the better way to reach the goal.\n\nGoal: to {goal}\n\n"
                           f"{_listing('Solution', options)}\n\nAnswer format: solution1/solution2")
            answer = f"solution{right}"
        elif kind == 2:
            sentence, who = BLANKS[j % len(BLANKS)]
            a, b = rng.sample(NAMES, 2)
            options = [a, b] if rng.random() < 0.5 else [b, a]
            answer = f"option{options.index(a if who == 'A' else b) + 1}"
            instruction = (f"Fill in the blank with the right option.\n\nSentence: "
                           f"{sentence.format(A=a, B=b)}\n\n{_listing('Option', options)}\n\n"
                           "Answer format: option1/option2")
        elif kind == 3:
            question, right_text, wrong = QUESTIONS[j % len(QUESTIONS)]
            k = 3 + j % 3
            options, right = _choices(rng, right_text, wrong, k)
            formats = "/".join(f"answer{m}" for m in range(1, k + 1))
            instruction = (f"Pick the correct answer to the question.\n\nQuestion: {question}\n\n"
                           f"{_listing('Answer', options)}\n\nAnswer format: {formats}")
            answer = f"answer{right}"
        else:
            context, good, bad = ENDINGS[j % len(ENDINGS)]
            options, right = _choices(rng, good, bad, 4)
            instruction = (f"Choose the ending that best completes the sentence.\n\nSentence: {context}"
                           f"\n\n{_listing('Ending', options)}\n\n"
                           "Answer format: ending1/ending2/ending3/ending4")
            answer = f"ending{right}"
        rows.append({"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
                     "answer": answer})
    return rows


# --------------------------------------------------------------------------- chat


def _count(k: int, unit: str) -> str:
    return f"{k} {unit}{'' if k == 1 else 's'}"


def chat_rows(n: int = ROWS, seed: int = 404) -> list[dict]:
    """Conversations ending with the assistant's turn: single turns, a system prompt, two turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            messages = [{"role": "user", "content": f"What is {a} times {b}?"},
                        {"role": "assistant", "content": f"{a} times {b} is {a * b}."}]
        elif kind == 1:
            m = rng.randint(61, 600)
            messages = [{"role": "system", "content": "You are a concise assistant."},
                        {"role": "user", "content": f"How many hours and minutes are {m} minutes?"},
                        {"role": "assistant",
                         "content": f"{m} minutes are {_count(m // 60, 'hour')} and "
                                    f"{_count(m % 60, 'minute')}."}]
        elif kind == 2:
            a = rng.randint(5, 30)
            b = rng.randint(1, a - 1)
            thing = rng.choice(["apples", "stickers", "marbles", "cookies"])
            messages = [{"role": "user", "content": f"I have {a} {thing}."},
                        {"role": "assistant", "content": f"Noted: you have {a} {thing}."},
                        {"role": "user", "content": f"I give away {b}. How many do I have now?"},
                        {"role": "assistant", "content": f"You have {a - b} {thing} left."}]
        else:
            w = rng.choice(WORDS)
            messages = [{"role": "user", "content": f"Spell the word \"{w}\" backwards."},
                        {"role": "assistant", "content": f"\"{w}\" backwards is \"{w[::-1]}\"."}]
        rows.append({"messages": messages})
    return rows


# --------------------------------------------------------------------------- GSM8K-style test rows

GSM_STORIES = [  # (question, lines of the worked answer); answer = a*b + sign*c
    (1, "{name} buys {a} notebooks at ${b} each and a backpack for ${c}. How many dollars does "
        "{name} spend in all?",
     "The notebooks cost {a} * {b} = $<<{a}*{b}={ab}>>{ab}.\nIn all, {name} spends {ab} + {c} = "
     "$<<{ab}+{c}={ans}>>{ans}."),
    (-1, "A farmer collects {a} eggs a day for {b} days and sells {c} of them. How many eggs are left?",
     "The farmer collects {a} * {b} = <<{a}*{b}={ab}>>{ab} eggs.\nAfter selling {c}, {ab} - {c} = "
     "<<{ab}-{c}={ans}>>{ans} eggs are left."),
    (-1, "A train has {a} cars with {b} seats in each car. If {c} seats are empty, how many "
         "passengers are on the train?",
     "The train has {a} * {b} = <<{a}*{b}={ab}>>{ab} seats.\nSo {ab} - {c} = <<{ab}-{c}={ans}>>{ans} "
     "passengers are on it."),
    (1, "{name} runs {a} laps of a {b}-meter track and then walks {c} meters. How many meters does "
        "{name} cover?",
     "The laps are {a} * {b} = <<{a}*{b}={ab}>>{ab} meters.\nWith the walk, {ab} + {c} = "
     "<<{ab}+{c}={ans}>>{ans} meters."),
    (-1, "A school orders {a} boxes of {b} pencils and hands out {c} pencils. How many pencils remain?",
     "The school gets {a} * {b} = <<{a}*{b}={ab}>>{ab} pencils.\nAfter handing out {c}, {ab} - {c} = "
     "<<{ab}-{c}={ans}>>{ans} remain."),
]


def gsm8k_test_rows(n: int = ROWS, seed: int = 505) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sign, question, worked = GSM_STORIES[i % len(GSM_STORIES)]
        a, b = rng.randint(3, 15), rng.randint(4, 25)
        c = rng.randint(1, a * b - 1) if sign < 0 else rng.randint(2, 60)
        v = {"a": a, "b": b, "c": c, "ab": a * b, "ans": a * b + sign * c, "name": rng.choice(NAMES)}
        rows.append({"question": question.format(**v),
                     "answer": worked.format(**v) + f"\n#### {v['ans']}"})
    return rows


# --------------------------------------------------------------------------- GLUE

SUBJECTS = ["the film", "the meal", "the concert", "this book", "the hotel", "our trip", "the game", "the class"]
GOOD = ["wonderful", "delightful", "great fun", "moving", "superb", "charming"]
BAD = ["dull", "a mess", "tiresome", "awful", "a letdown", "painful"]
ACTIONS = [("bought", "purchased"), ("fixed", "repaired"), ("started", "began"), ("left", "departed from"),
           ("watched", "saw"), ("sold", "traded away")]
THINGS = ["the old car", "a small boat", "the red house", "two bikes", "the shop", "a new phone"]


def sst2_rows(n: int = ROWS, seed: int = 606) -> list[dict]:
    """Sentiment of a one-line review: label 1 when its adjective is from the positive list."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        adjective = rng.choice(GOOD if label else BAD)
        rows.append({"sentence": f"{rng.choice(SUBJECTS)} was {adjective} .", "label": label, "idx": i})
    return rows


def mrpc_rows(n: int = ROWS, seed: int = 707) -> list[dict]:
    """Sentence pairs: label 1 when the second says the same with a synonym, 0 when it changes the facts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, (verb, synonym), thing = rng.choice(NAMES), rng.choice(ACTIONS), rng.choice(THINGS)
        first = f"{name} {verb} {thing} on Monday."
        label = i % 2
        if label:
            second = f"On Monday, {name} {synonym} {thing}."
        else:
            other = rng.choice([t for t in THINGS if t != thing])
            second = f"On Friday, {rng.choice([m for m in NAMES if m != name])} {synonym} {other}."
        rows.append({"sentence1": first, "sentence2": second, "label": label, "idx": i})
    return rows


def stsb_rows(n: int = ROWS, seed: int = 808) -> list[dict]:
    """Sentence pairs scored 0-5 by how many of their four facts (who, verb, what, when) agree."""
    rng = random.Random(seed)
    days = ["Monday", "Tuesday", "Friday", "Sunday"]
    rows = []
    for i in range(n):
        a = [rng.choice(NAMES), rng.choice(ACTIONS), rng.choice(THINGS), rng.choice(days)]
        b = list(a)
        for k in rng.sample(range(4), rng.randint(0, 4)):  # change some facts
            pool = [NAMES, ACTIONS, THINGS, days][k]
            b[k] = rng.choice([x for x in pool if x != a[k]])
        same = sum(x == y for x, y in zip(a, b))
        rows.append({"sentence1": f"{a[0]} {a[1][0]} {a[2]} on {a[3]}.",
                     "sentence2": f"On {b[3]}, {b[0]} {b[1][1]} {b[2]}.",
                     "label": round(5.0 * same / 4, 2), "idx": i})
    return rows


# --------------------------------------------------------------------------- writing

SAMPLES = {  # file name -> rows
    "metamath.jsonl": metamath_rows,
    "alpaca.jsonl": alpaca_rows,
    "commonsense.json": commonsense_rows,
    "chat.jsonl": chat_rows,
    "gsm8k_test.jsonl": gsm8k_test_rows,
    "glue_sst2.jsonl": sst2_rows,
    "glue_mrpc.jsonl": mrpc_rows,
    "glue_stsb.jsonl": stsb_rows,
}


def render(name: str, rows: list[dict]) -> str:
    """The file's text: JSON Lines, or one indented JSON list for ``.json`` (as LLM-Adapters ships)."""
    if name.endswith(".jsonl"):
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return json.dumps(rows, ensure_ascii=False, indent=4) + "\n"


def write_samples(out_dir: str) -> list[tuple[str, int, int]]:
    """Write every sample file into ``out_dir``; returns (path, rows, bytes) per file."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, make in SAMPLES.items():
        rows = make()
        text = render(name, rows)
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        written.append((path, len(rows), len(text.encode("utf-8"))))
    return written


def main(argv: list[str] | None = None) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(repo, "data", "samples"),
                        help="directory to write into (default: data/samples of this repository)")
    args = parser.parse_args(argv)
    for path, rows, size in write_samples(args.out):
        print(f"wrote {path}: {rows} rows, {size} bytes")


if __name__ == "__main__":
    main()
