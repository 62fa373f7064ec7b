"""Answer scoring of generated text: GSM8K, MATH and commonsense (torch-free; GLUE's metrics are in
``glue.py``). ``evaluate.py`` generates; this module reads the answers and the golds.

Scoring
-------
Numbers (GSM8K and MATH): an optional sign (``-``, ``+``, ``−``) not glued to a preceding letter,
digit or closing bracket and directly followed by the digits (or by ``$`` and the digits); digits with
optional thousands separators (``1,234``: groups of exactly three) and an optional decimal part
(``3.50``, ``.5``); optionally ``/digits`` directly after (``3/4``, a fraction). Values are exact
rationals (``fractions.Fraction``), so ``3.50 == 3.5``, ``3/4 == 0.75``, ``1,234 == 1234``, but
``0.33 != 1/3``. Anything around a number (``$``, ``%``, a trailing period, units) is not part of it.
A zero denominator leaves the numerator alone. Number words are not numbers.

* GSM8K strict: the first number after the last final-answer marker, ``The answer is:`` (any spacing
  around ``is`` and ``:``; case as written) or GSM8K's own ``####``, whichever comes last; no marker
  or no number after it: no prediction, wrong.
* MATH strict: the text after the last ``The answer is:`` up to the end of its line, with ``$``
  signs and a trailing period removed; correct when its normalized form equals the gold's
  (``normalize_math``) or both read as the same number (``math_value``: plain numbers, ``a/b``,
  ``\\frac{a}{b}``, a leading minus).
* Flexible (GSM8K and MATH): the last number anywhere in the generation, compared with the gold's
  value (a MATH gold that is not a number cannot be matched this way).
* Commonsense strict: the first token of the gold's family found in the generation as a whole word
  (not part of a longer word or number; case-sensitive, as the datasets write them), exact match with
  the gold. Commonsense flexible: the last such token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from .errors import ConfigError

TASKS = ("gsm8k", "math", "commonsense", "glue")

# --------------------------------------------------------------------------- numbers

_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])(?P<sign>[-+\u2212])(?=\$?[\d.]))?"  # a sign not glued to the preceding text
    r"\$?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"  # 1,234.5 | 1234.5 | .5
    r"(?:/(?P<den>\d+)(?!\.\d))?"  # a fraction 3/4 (not 3/4.5)
)

_ANSWER_MARKER = re.compile(r"The\s+answer\s+is\s*:")
# GSM8K's final-answer markers: the reference's "The answer is:" and GSM8K's own "#### N", so a model
# trained on either layout (MetaMathQA's, or openai/gsm8k's answers) is read by strict scoring.
_GSM8K_MARKER = re.compile(r"The\s+answer\s+is\s*:|####")


def _number_value(match: re.Match) -> Fraction:
    value = Fraction(match.group("num").replace(",", ""))
    den = match.group("den")
    if den is not None and int(den) != 0:
        value /= int(den)
    if match.group("sign") in ("-", "\u2212"):
        value = -value
    return value


def find_numbers(text: str) -> list[Fraction]:
    """Every number in ``text``, in order, as exact rationals (see the module docstring)."""
    return [_number_value(m) for m in _NUMBER.finditer(text)]


def parse_number(text: str) -> Fraction | None:
    """``text`` as one number, allowing surrounding spaces, ``$``, ``%`` and a trailing period."""
    stripped = text.strip().rstrip(".").strip().removesuffix("%").strip()
    match = _NUMBER.fullmatch(stripped)
    return _number_value(match) if match else None


def format_number(value: Fraction | None) -> str | None:
    """Canonical text of a value: ``1234``, ``-3.5``, ``1/3`` (a fraction when no finite decimal exists)."""
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    for digits in range(1, 40):
        scaled = value * 10 ** digits
        if scaled.denominator == 1:
            sign = "-" if scaled < 0 else ""
            text = str(abs(scaled.numerator)).rjust(digits + 1, "0")
            return f"{sign}{text[:-digits]}.{text[-digits:]}"
    return f"{value.numerator}/{value.denominator}"


def text_after_answer_marker(generation: str, marker: re.Pattern = _ANSWER_MARKER) -> str | None:
    """What follows the last ``marker`` (default ``The answer is:``) of the generation; None without one."""
    last = None
    for last in marker.finditer(generation):
        pass
    return None if last is None else generation[last.end():]


def extract_strict(generation: str) -> Fraction | None:
    """GSM8K strict: the first number after the last final-answer marker, ``The answer is:`` or ``####``."""
    rest = text_after_answer_marker(generation, _GSM8K_MARKER)
    if rest is None:
        return None
    match = _NUMBER.search(rest)
    return _number_value(match) if match else None


def extract_flexible(generation: str) -> Fraction | None:
    """The last number anywhere in the generation."""
    numbers = find_numbers(generation)
    return numbers[-1] if numbers else None


def gsm8k_gold(answer) -> Fraction:
    """The number after the last ``####`` of a GSM8K answer, or the answer itself when it is a number.

    Raises ValueError when there is none.
    """
    text = str(answer)
    head, sep, tail = text.rpartition("####")
    if sep:
        match = _NUMBER.search(tail)
        if match is None:
            raise ValueError(f"no number after '####' in {tail.strip()[:60]!r}")
        return _number_value(match)
    value = parse_number(text)
    if value is None:
        raise ValueError(f"no '####' and not a number: {text.strip()[:60]!r}")
    return value


# --------------------------------------------------------------------------- MATH answers

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``."""
    starts = list(_BOXED.finditer(text))
    for match in reversed(starts):
        i = match.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
            continue  # unbalanced: try an earlier one
        token = re.match(r"[^\s$]+", text[i:])
        if token:
            return token.group(0).strip()
    return None


def extract_math_strict(generation: str) -> str | None:
    """MATH strict: the rest of the line after the last ``The answer is:``, ``$`` and a final period gone."""
    rest = text_after_answer_marker(generation)
    if rest is None:
        return None
    line = rest.strip().split("\n", 1)[0].strip()
    line = line.replace("$", "").strip().rstrip(".").strip()
    return line or None


def normalize_math(answer: str) -> str:
    """A comparable form of a MATH answer: LaTeX spacing, sizing, ``\\text``, degrees, percent and dollar
    signs, ``\\dfrac``/``\\tfrac``, a leading ``x =`` and a trailing period dropped; ``\\frac12`` and
    ``\\sqrt2`` braced; all whitespace removed."""
    s = answer.strip()
    if _BOXED.match(s):
        s = last_boxed(s) or s
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\%", ""), ("%", ""),
                     ("\\$", ""), ("$", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\ ", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[A-Za-z]=(?=.)", "", s)  # "x=5" -> "5"
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    return s.rstrip(".")


_LATEX_FRAC = re.compile(r"(?P<neg>-?)\\frac\{(?P<a>[^{}]+)\}\{(?P<b>[^{}]+)\}")


def math_value(answer: str) -> Fraction | None:
    """A MATH answer as a number when it is one: ``12``, ``-3.5``, ``1,000``, ``3/4``, ``\\frac{3}{4}``,
    ``-\\frac{1}{2}``; None otherwise."""
    s = normalize_math(answer)
    frac = _LATEX_FRAC.fullmatch(s)
    if frac:
        a, b = parse_number(frac.group("a")), parse_number(frac.group("b"))
        if a is None or b is None or b == 0:
            return None
        value = a / b
        return -value if frac.group("neg") else value
    return parse_number(s)


def math_equal(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    if normalize_math(prediction) == normalize_math(gold):
        return True
    a, b = math_value(prediction), math_value(gold)
    return a is not None and a == b


def math_gold(row: dict) -> str:
    """The gold answer of a MATH row: its ``answer`` when present, else the last boxed of ``solution``."""
    given = row.get("answer")
    if given is not None and str(given).strip():
        return str(given).strip()
    boxed = last_boxed(str(row.get("solution") or ""))
    if not boxed:
        raise ValueError("no 'answer' and no \\boxed{...} in 'solution'")
    return boxed


# --------------------------------------------------------------------------- commonsense answers

COMMONSENSE_FAMILIES = {
    "answer": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "option": ["option1", "option2"],
    "solution": ["solution1", "solution2"],
    "ending": ["ending1", "ending2", "ending3", "ending4"],
    "true/false": ["true", "false"],
}
_FAMILY_PATTERNS = {
    family: re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(tokens) + r")(?![A-Za-z0-9_])")
    for family, tokens in COMMONSENSE_FAMILIES.items()
}


def commonsense_family(gold) -> str:
    """The family of a gold answer token (``answer3`` -> ``answer``); ValueError for anything else."""
    token = str(gold).strip()
    for family, tokens in COMMONSENSE_FAMILIES.items():
        if token in tokens:
            return family
    known = ", ".join(t for tokens in COMMONSENSE_FAMILIES.values() for t in tokens)
    raise ValueError(f"{token[:40]!r} is not an answer token ({known})")


def extract_commonsense(generation: str, family: str, last: bool = False) -> str | None:
    """The first (or ``last``) token of ``family`` in the generation, as a whole word; None if absent."""
    found = _FAMILY_PATTERNS[family].findall(generation)
    if not found:
        return None
    return found[-1] if last else found[0]


# --------------------------------------------------------------------------- rows and scores


@dataclass
class Example:
    index: int
    query: str
    prompt: str
    gold: str  # canonical text of the gold answer
    gold_value: Fraction | None = None  # GSM8K / MATH: the gold as a number, when it is one
    family: str | None = None  # commonsense: the gold token's family
    texts: tuple[str, ...] = ()  # GLUE: the sentence or the sentence pair
    label: float | int | None = None  # GLUE: the gold class (or score, stsb)


def score(task: str, generation: str, example: Example) -> dict:
    """``prediction_strict``, ``prediction_flexible`` (text or None) and ``correct_strict``,
    ``correct_flexible`` of one generation (see the module docstring)."""
    if task == "commonsense":
        strict = extract_commonsense(generation, example.family)
        flexible = extract_commonsense(generation, example.family, last=True)
        ok_strict, ok_flexible = strict == example.gold, flexible == example.gold
    elif task == "gsm8k":
        strict_value, flexible_value = extract_strict(generation), extract_flexible(generation)
        strict, flexible = format_number(strict_value), format_number(flexible_value)
        ok_strict = strict_value is not None and strict_value == example.gold_value
        ok_flexible = flexible_value is not None and flexible_value == example.gold_value
    elif task == "math":
        strict = extract_math_strict(generation)
        flexible_value = extract_flexible(generation)
        flexible = format_number(flexible_value)
        ok_strict = math_equal(strict, example.gold)
        ok_flexible = flexible_value is not None and flexible_value == example.gold_value
    else:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return {"prediction_strict": strict, "prediction_flexible": flexible,
            "correct_strict": bool(ok_strict), "correct_flexible": bool(ok_flexible)}
