"""Instruction data: rows, prompts, tokenization, padding, and which rank sees which example.

The pipeline, in order:

1. ``load_rows``: a ``datasets.Dataset`` read from ``data.path`` (a local ``.json``/``.jsonl``/
   ``.parquet`` file, a local directory, or a hub dataset name with ``data.subset``/``data.split``)
   or, with no path, built from ``synthetic_math_rows`` (small MetaMathQA-shaped arithmetic word
   problems, so a run needs no download). Its columns are checked against ``data.format``.
2. ``render_rows``: each row as prompt text and response text, as its format says:

   * ``metamath``: ``query`` -> Alpaca prompt (or the plain query, or the query as the user turn of the
     tokenizer's chat template: ``data.prompt_template``), ``response`` as is;
   * ``alpaca``: ``instruction`` (+ ``input`` when not empty) -> Alpaca prompt, ``output``;
   * ``commonsense``: as ``alpaca``, and the gold ``answer`` (``answer1``, ``option2``, ``true``, ...)
     is kept for evaluation;
   * ``chat``: ``messages`` minus the last (assistant) turn through the tokenizer's chat template with
     the generation prompt, and the last assistant message as the response;
   * ``glue`` (sequence classification): no prompt; the task's sentence or sentence pair is encoded
     as the model's tokenizer does it, and ``label`` is the target (see ``glue.py``).

3. ``tokenize_rows``: prompt + response + eos as token ids; the loss is masked (-100) on the prompt,
   so the model learns only to answer. Labels are *not* shifted: the HF model shifts them itself.
4. ``collate``: right-pads a micro-batch into ``(batch, seq)`` int64 tensors.
5. ``train_batches`` / ``estimation_batches``: lists of example indices for one rank. They are pure
   functions of (sizes, rank, world size, seed), so every rank computes its own share without any
   communication, and every rank gets the same number of micro-batches (a rank that ran one batch
   more than the others would hang in the next collective).

Everything up to the batches is deterministic: the rows keep the order of their source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random

import datasets
import torch

from .config import ConfigError, DataConfig
from .glue import is_regression, task_of

IGNORE_INDEX = -100  # label value the HF cross-entropy skips

FORMATS = ("metamath", "alpaca", "commonsense", "chat", "glue")

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:\n"
)
# The Alpaca prompt of a row whose instruction comes with an input (context) to work on.
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Input:\n{input}\n\n### Response:\n"
)


PROMPT_TEMPLATES = ("alpaca", "plain", "chat")


def format_prompt(query: str, template: str, tokenizer=None) -> str:
    """The text the model is conditioned on; the response follows it directly.

    ``alpaca``: the Alpaca template; ``plain``: the query and a newline; ``chat``: the query as the one
    user turn of ``tokenizer``'s chat template, with the assistant's header (the template writes the
    special tokens). Training rows and ``lorasb eval`` prompts both come from here.
    """
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(query=query)
    if template == "plain":
        return query + "\n"
    if template == "chat":
        require_chat_template(tokenizer, "data.prompt_template=chat")
        return tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                             tokenize=False)
    raise ConfigError(f"data.prompt_template must be one of {', '.join(PROMPT_TEMPLATES)}, got '{template}'")


def template_writes_special_tokens(fmt: str, prompt_template: str) -> bool:
    """Whether prompts of ``data.format=fmt`` with ``data.prompt_template`` come from a chat template, which
    writes bos and the turn tokens itself (so the tokenizer must not add its own)."""
    return fmt == "chat" or (fmt == "metamath" and prompt_template == "chat")


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    """The Alpaca prompt with the input section when ``input_text`` holds more than whitespace."""
    if input_text is not None and input_text.strip():
        return ALPACA_INPUT_TEMPLATE.format(query=instruction, input=input_text)
    return ALPACA_TEMPLATE.format(query=instruction)


# --------------------------------------------------------------------------- built-in data

_PEOPLE = [("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Leo", "he"),
           ("Eva", "she"), ("Max", "he"), ("Zoe", "she"), ("Ben", "he"), ("Lily", "she")]
_THINGS = ["apples", "pens", "cards", "books", "eggs", "shells", "stamps", "coins", "marbles"]
_SHOP_ITEMS = ["pens", "books", "cups", "hats", "toys", "cakes"]


def _math_problem(rng: random.Random) -> tuple[str, str]:
    """One word problem and its step-by-step solution, from one of five templates."""
    name, he = rng.choice(_PEOPLE)
    He = he.capitalize()
    kind = rng.randrange(5)
    if kind == 0:  # start + bags * per_bag
        a, b, c = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
        obj = rng.choice(_THINGS)
        x = b * c
        ans = a + x
        query = (f"{name} has {a} {obj}. {He} buys {b} bags with {c} {obj} each. "
                 f"How many {obj} does {he} have now?")
        steps = f"{b} * {c} = {x}. {a} + {x} = {ans}."
    elif kind == 1:  # start - given + found
        a = rng.randint(10, 60)
        b, c = rng.randint(1, a - 1), rng.randint(1, 30)
        obj = rng.choice(_THINGS)
        x = a - b
        ans = x + c
        query = (f"{name} had {a} {obj}. {He} gave away {b} and then found {c} more. "
                 f"How many {obj} does {he} have?")
        steps = f"{a} - {b} = {x}. {x} + {c} = {ans}."
    elif kind == 2:  # change from a payment
        a, b = rng.randint(2, 9), rng.randint(2, 15)
        x = a * b
        c = x + rng.randint(1, 50)
        ans = c - x
        item = rng.choice(_SHOP_ITEMS)
        query = (f"{name} buys {a} {item} at ${b} each and pays with ${c}. "
                 f"How much change does {he} get?")
        steps = f"{a} * {b} = {x}. {c} - {x} = {ans}."
    elif kind == 3:  # equal share, then a bonus
        b, x, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
        a = b * x
        ans = x + c
        obj = rng.choice(_THINGS)
        query = (f"{name} splits {a} {obj} equally among {b} friends. "
                 f"Each friend then gets {c} more. How many does each friend have?")
        steps = f"{a} / {b} = {x}. {x} + {c} = {ans}."
    else:  # pages per day over days, plus extra
        a, b, c = rng.randint(5, 40), rng.randint(2, 9), rng.randint(1, 50)
        x = a * b
        ans = x + c
        query = (f"{name} reads {a} pages a day for {b} days, then {c} more pages. "
                 f"How many pages did {he} read?")
        steps = f"{a} * {b} = {x}. {x} + {c} = {ans}."
    return query, f"{steps} The answer is: {ans}"


def synthetic_math_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{"query", "response"}``; the same rows for the same seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        query, response = _math_problem(rng)
        rows.append({"query": query, "response": response})
    return rows


# --------------------------------------------------------------------------- loading

# Columns each format needs (besides metamath's configurable pair), with what they hold.
_FORMAT_COLUMNS = {
    "alpaca": {"instruction": "the instruction", "output": "the response"},
    "commonsense": {"instruction": "the question with its choices", "output": "the response",
                    "answer": "the gold answer (answer1, option2, true, ...)"},
    "chat": {"messages": "the conversation, a list of {role, content}"},
}
_OPTIONAL_INPUT = "input"  # alpaca and commonsense: context after the instruction; may be absent


def _is_blank(path: str) -> bool:
    """True when the file holds nothing but whitespace (reads only until the first real byte)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _source_name(cfg: DataConfig) -> str:
    """How error messages name where the rows come from."""
    if not cfg.path:
        return "the built-in data"
    expanded = os.path.expanduser(cfg.path)
    if os.path.isfile(expanded):
        return f"data.path '{cfg.path}'"
    subset = f"data.subset '{cfg.subset}', " if cfg.subset else ""
    return f"data.path '{cfg.path}' ({subset}data.split '{cfg.split}')"


def _formats_fitting(column_names) -> list[str]:
    """Formats whose required columns are all present (commonsense before alpaca: it is the stricter)."""
    cols = set(column_names)
    fits = [f for f in ("commonsense", "alpaca", "chat") if set(_FORMAT_COLUMNS[f]) <= cols]
    if {"query", "response"} <= cols:
        fits.append("metamath")
    return fits


def _check_columns(column_names: list[str], cfg: DataConfig, source: str) -> None:
    present = ", ".join(column_names)
    others = [f for f in _formats_fitting(column_names) if f != cfg.format]
    hint = f" (the columns fit data.format={others[0]})" if others else ""
    if cfg.format == "metamath":
        for setting, column in (("data.query_field", cfg.query_field),
                                ("data.response_field", cfg.response_field)):
            if column not in column_names:
                raise ConfigError(
                    f"{source} has no column '{column}' (columns present: {present}); "
                    f"set {setting} to the column that holds the "
                    f"{'query' if setting == 'data.query_field' else 'response'}, "
                    f"or data.format to the layout of the data{hint}"
                )
        return
    needed = _FORMAT_COLUMNS.get(cfg.format)
    if cfg.format == "glue":
        needed = {c: "the text" for c in task_of(cfg.glue_task).text_columns}
        needed["label"] = "the label"
    if needed is None:
        raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got '{cfg.format}'")
    for column, what in needed.items():
        if column not in column_names:
            raise ConfigError(
                f"{source} has no column '{column}' (columns present: {present}), which "
                f"data.format={cfg.format} needs for {what}; data.format={cfg.format} expects columns "
                f"{', '.join(needed)}{' (and optionally input)' if cfg.format != 'chat' else ''}: "
                f"fix the data or set data.format to its layout{hint}"
            )


def _load_file(cfg: DataConfig) -> datasets.Dataset:
    path = os.path.expanduser(cfg.path)
    lower = path.lower()
    if lower.endswith((".json", ".jsonl")):
        builder, kind = "json", "JSON/JSON Lines"
        if _is_blank(path):
            raise ConfigError(f"data.path '{cfg.path}' is empty: it holds no rows")
    elif lower.endswith(".parquet"):
        builder, kind = "parquet", "Parquet"
    else:
        raise ConfigError(f"data.path '{cfg.path}': expected a .json, .jsonl or .parquet file, a "
                          "directory or a hub dataset name (convert other files to JSON Lines: one "
                          "row per line, with the columns of data.format)")
    if cfg.split != "train" or cfg.subset:
        raise ConfigError(f"data.path '{cfg.path}' is a single file, which is one split: data.split "
                          "and data.subset apply to directories and hub datasets only; drop them")
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # datasets raises many types for malformed files
        bad = _first_bad_json_line(path) if lower.endswith(".jsonl") else None
        if bad:
            raise ConfigError(f"data.path '{cfg.path}' could not be read as JSON Lines: {bad}; fix that line "
                              "(one JSON object per line)") from None
        raise ConfigError(f"data.path '{cfg.path}' could not be read as {kind} (is it empty or "
                          f"malformed?): {type(e).__name__}: {e}") from e


def _first_bad_json_line(path: str) -> str | None:
    """'line N is not a JSON object (why)' for the first such line of a JSON Lines file, else None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return f"line {number} is not a JSON object (a {type(row).__name__})"
    return None


def _load_directory(cfg: DataConfig) -> datasets.Dataset:
    path = os.path.expanduser(cfg.path)
    source = _source_name(cfg)
    saved_dict = os.path.isfile(os.path.join(path, "dataset_dict.json"))
    saved_one = os.path.isfile(os.path.join(path, "state.json"))
    try:
        if saved_dict or saved_one:  # written by save_to_disk
            if cfg.subset:
                raise ConfigError(f"data.path '{cfg.path}' was written by save_to_disk and has no "
                                  "subsets: drop data.subset")
            loaded = datasets.load_from_disk(path)
            if saved_one:
                if cfg.split != "train":
                    raise ConfigError(f"data.path '{cfg.path}' holds a single saved split: drop "
                                      "data.split")
                return loaded
            if cfg.split not in loaded:
                raise ConfigError(f"{source}: no split '{cfg.split}' (splits present: "
                                  f"{', '.join(loaded)}); set data.split to one of them")
            return loaded[cfg.split]
        return datasets.load_dataset(path, cfg.subset, split=cfg.split)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{source} could not be loaded (check data.subset and data.split against "
                          f"the files in it): {type(e).__name__}: {_short(e)}") from e


def _load_hub(cfg: DataConfig) -> datasets.Dataset:
    source = _source_name(cfg)
    try:
        return datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
    except Exception as e:
        offline = bool(datasets.config.HF_HUB_OFFLINE) or any(
            os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
            for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so it could not be "
               "downloaded; download it on a machine with hub access (scripts/download_datasets.py) "
               "and point data.path at the local copy" if offline else
               "check the name, data.subset, data.split and network access; if you meant a local "
               "path, it does not exist")
        raise ConfigError(f"{source} is not a local file or directory, so it was read as a hub dataset "
                          f"and could not be loaded: {why}. {type(e).__name__}: {_short(e)}") from e


def _short(e: Exception, limit: int = 600) -> str:
    text = str(e)
    return text if len(text) <= limit else text[:limit] + " ..."


def load_rows(cfg: DataConfig, seed: int) -> datasets.Dataset:
    """The raw rows of ``cfg.path``, checked to be non-empty and to have the columns of ``cfg.format``."""
    kind = cfg.source_kind()
    if kind == "builtin":
        if cfg.format != "metamath":
            raise ConfigError(f"data.format={cfg.format} needs data.path: the built-in synthetic set "
                              "(no data.path) has the metamath format")
        rows = synthetic_math_rows(cfg.builtin_size, seed)
        # Built-in rows follow the configured column names, so tokenize_rows needs no special case.
        rows = [{cfg.query_field: r["query"], cfg.response_field: r["response"]} for r in rows]
        return datasets.Dataset.from_list(rows)

    if kind == "hub" and cfg.format == "glue" and not cfg.subset:  # nyu-mll/glue: the subset is the task
        cfg = dataclasses.replace(cfg, subset=cfg.glue_task)
    ds = {"file": _load_file, "dir": _load_directory, "hub": _load_hub}[kind](cfg)
    source = _source_name(cfg)
    if len(ds) == 0:
        raise ConfigError(f"{source} is empty: it holds no rows")
    _check_columns(ds.column_names, cfg, source)
    return ds


def split_held_out(rows: datasets.Dataset, cfg: DataConfig, seed: int
                   ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, held-out rows or None) as ``data.eval_path``, ``eval_split`` or ``eval_fraction`` say.

    A fraction is a seeded choice of the rows (at least one, and at least one left to train on)."""
    if cfg.eval_fraction:
        held = max(1, round(cfg.eval_fraction * len(rows)))
        if held >= len(rows):
            raise ConfigError(f"data.eval_fraction = {cfg.eval_fraction} of {len(rows)} rows leaves none to "
                              "train on; lower it or use more data")
        order = _permutation(len(rows), seed)
        return rows.select(sorted(order[held:])), rows.select(sorted(order[:held]))
    if not (cfg.eval_path or cfg.eval_split):
        return rows, None
    source = (dataclasses.replace(cfg, path=cfg.eval_path, split="train", subset=None) if cfg.eval_path
              else dataclasses.replace(cfg, split=cfg.eval_split))
    setting = "data.eval_path" if cfg.eval_path else "data.eval_split"
    try:
        return rows, load_rows(source, seed)
    except ConfigError as e:
        raise ConfigError(f"{setting}: {e}") from None


# --------------------------------------------------------------------------- prompts per format


def _text(value, i: int, column: str, source: str, setting: str, optional: bool = False) -> str:
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"row {i} of {source}: the '{column}' column ({setting}) holds {value!r}, "
                          "not text; fix the row or point the setting at a text column")
    return value


def _render_chat(messages, i: int, tokenizer, source: str) -> tuple[str, str]:
    where = f"row {i} of {source}"
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"{where}: 'messages' (data.format=chat) must be a list of at least two "
                          f"{{role, content}} turns ending with the assistant's, got {messages!r}"[:400])
    turns = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: every message (data.format=chat) needs a text 'role' and "
                              f"'content', got {m!r}"[:400])
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's answer to learn "
                          f"(data.format=chat), got role '{turns[-1]['role']}'")
    try:
        prompt = tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise ConfigError(f"{where}: the tokenizer's chat template rejected the conversation: "
                          f"{type(e).__name__}: {_short(e, 300)}") from e
    return prompt, turns[-1]["content"]


def _chat_template_of(tokenizer) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


def require_chat_template(tokenizer, setting: str) -> None:
    """A clear error when ``tokenizer`` has no chat template for ``setting`` to use."""
    if tokenizer is None or _chat_template_of(tokenizer) is None:
        name = getattr(tokenizer, "name_or_path", "") or "the built-in tiny tokenizer"
        raise ConfigError(
            f"{setting} needs a tokenizer with a chat template, and {name} has none "
            "(tokenizer.chat_template is empty); use the tokenizer of a chat/instruct model "
            "(model.name_or_path), or another prompt format"
        )


def render_rows(rows: datasets.Dataset, cfg: DataConfig, tokenizer=None) -> list[dict[str, str]]:
    """Each row as ``{"prompt", "response"}`` text (plus ``"answer"`` for ``commonsense``).

    ``tokenizer`` is needed only by a chat template (``data.format=chat``, ``data.prompt_template=chat``). Evaluation code can
    use the prompts as they are, and the commonsense answers as gold labels.
    """
    source = _source_name(cfg) if cfg.path else "the dataset"
    _check_columns(rows.column_names, cfg, source)
    fmt = cfg.format
    out: list[dict[str, str]] = []
    if fmt == "metamath":
        queries, responses = list(rows[cfg.query_field]), list(rows[cfg.response_field])
        for i, (q, r) in enumerate(zip(queries, responses)):
            q = _text(q, i, cfg.query_field, source, "data.query_field")
            r = _text(r, i, cfg.response_field, source, "data.response_field")
            out.append({"prompt": format_prompt(q, cfg.prompt_template, tokenizer), "response": r})
    elif fmt in ("alpaca", "commonsense"):
        n = len(rows)
        setting = f"data.format={fmt}"
        instructions, outputs = list(rows["instruction"]), list(rows["output"])
        inputs = list(rows[_OPTIONAL_INPUT]) if _OPTIONAL_INPUT in rows.column_names else [None] * n
        answers = list(rows["answer"]) if fmt == "commonsense" else [None] * n
        for i in range(n):
            instruction = _text(instructions[i], i, "instruction", source, setting)
            input_text = _text(inputs[i], i, "input", source, setting, optional=True)
            item = {"prompt": alpaca_prompt(instruction, input_text),
                    "response": _text(outputs[i], i, "output", source, setting)}
            if fmt == "commonsense":
                item["answer"] = _text(answers[i], i, "answer", source, setting)
            out.append(item)
    elif fmt == "chat":
        require_chat_template(tokenizer, "data.format=chat")
        for i, messages in enumerate(rows["messages"]):
            prompt, response = _render_chat(messages, i, tokenizer, source)
            out.append({"prompt": prompt, "response": response})
    else:
        raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    return out


# --------------------------------------------------------------------------- tokenizing


def tokenize_rows(rows: datasets.Dataset, tokenizer, cfg: DataConfig) -> tuple[list[dict[str, list[int]]], int]:
    """Rows -> ``[{"input_ids", "labels"}]`` (same length each) and the number truncated.

    ``input_ids = prompt + response + [eos]``; ``labels`` is -100 on the prompt and equals
    ``input_ids`` on the rest. Both are cut to ``cfg.max_length``. A row whose prompt alone fills
    ``max_length`` has no label left to learn from (its loss would be 0/0); it is dropped, and
    counted among the truncated ones. ``commonsense`` examples also carry their gold ``"answer"``.

    The prompt is tokenized with the tokenizer's special tokens (``<s>``/bos first), except when a chat
    template made it (``template_writes_special_tokens``): the template writes them itself.
    """
    if cfg.format == "glue":
        return tokenize_glue(rows, tokenizer, cfg)
    rendered = render_rows(rows, cfg, tokenizer)
    prompts = [item["prompt"] for item in rendered]
    responses = [item["response"] for item in rendered]
    special = not template_writes_special_tokens(cfg.format, cfg.prompt_template)
    prompt_ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]

    examples, truncated = [], 0
    for item, p, r in zip(rendered, prompt_ids, response_ids):
        r = r + [tokenizer.eos_token_id]
        input_ids = p + r
        labels = [IGNORE_INDEX] * len(p) + r
        if len(input_ids) > cfg.max_length:
            truncated += 1
            input_ids, labels = input_ids[: cfg.max_length], labels[: cfg.max_length]
            if len(p) >= cfg.max_length:
                continue
        example = {"input_ids": input_ids, "labels": labels}
        if "answer" in item:
            example["answer"] = item["answer"]
        examples.append(example)
    return examples, truncated


def tokenize_glue(rows: datasets.Dataset, tokenizer, cfg: DataConfig) -> tuple[list[dict], int]:
    """GLUE rows -> ``[{"input_ids", "labels"}]`` with ``labels`` one int (a float for ``stsb``).

    A pair is encoded together (``<s> a </s></s> b </s>`` for RoBERTa); a longer encoding is cut to
    ``cfg.max_length`` (longest text first) and counted. A row without a label (-1, as in GLUE's test
    splits) is an error: train on a labelled split.
    """
    task = task_of(cfg.glue_task)
    source = _source_name(cfg)
    texts = [[_text(v, i, c, source, "data.glue_task") for i, v in enumerate(rows[c])] for c in task.text_columns]
    full = tokenizer(*texts)["input_ids"]
    ids = tokenizer(*texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    examples = []
    for i, (x, label) in enumerate(zip(ids, rows["label"])):
        if label is None or (not is_regression(task) and not 0 <= label < task.num_labels):
            raise ConfigError(f"row {i} of {source}: label {label!r} is not a class of {cfg.glue_task} "
                              f"(0..{task.num_labels - 1}); GLUE test splits are unlabelled (-1): "
                              "train on the train split")
        examples.append({"input_ids": x, "labels": float(label) if is_regression(task) else int(label)})
    truncated = sum(len(a) > len(b) for a, b in zip(full, ids))
    return examples, truncated


def describe_truncation(truncated: int, max_length: int, num_rows: int, num_examples: int) -> str:
    """One report line on truncation, e.g. for the trainer to print after ``tokenize_rows``.

    ``num_rows``: rows given to ``tokenize_rows``; ``num_examples``: examples it returned (rows whose
    prompt alone fills ``max_length`` are dropped).
    """
    if truncated == 0:
        return f"no sample is longer than data.max_length={max_length} tokens ({num_rows} samples)"
    dropped = num_rows - num_examples
    line = (f"{truncated} of {num_rows} samples ({100.0 * truncated / max(num_rows, 1):.1f}%) are longer "
            f"than data.max_length={max_length} tokens and were cut")
    if dropped:
        line += f"; {dropped} of them were dropped, their prompt alone filling max_length"
    return line + "; raise data.max_length to keep them whole"


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels``, each (B, T) int64.

    Classification examples (one label each) give ``labels`` of shape (B,): int64, or fp32 for regression.
    """
    seq = max(len(ex["input_ids"]) for ex in examples)
    batch = len(examples)
    if not isinstance(examples[0]["labels"], list):
        dtype = torch.float32 if isinstance(examples[0]["labels"], float) else torch.long
        padded = collate([dict(ex, labels=[]) for ex in examples], pad_token_id)
        return dict(padded, labels=torch.tensor([ex["labels"] for ex in examples], dtype=dtype))
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :len(ex["labels"])] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- sharding


def _permutation(n: int, seed: int) -> list[int]:
    """The same permutation of range(n) on every rank and machine (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def train_batches(num_examples: int, micro_batch: int, rank: int, world_size: int, epoch: int,
                  seed: int) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch.

    A fresh shuffle per epoch (seed + epoch); rank r takes every world_size-th index starting at r,
    all ranks keep ``num_examples // world_size`` of them and drop an incomplete last micro-batch,
    so every rank gets ``(num_examples // world_size) // micro_batch`` batches.
    """
    per_rank = num_examples // world_size
    num_batches = per_rank // micro_batch
    if num_batches == 0:
        raise ConfigError(
            f"the dataset has {num_examples} examples, too few for one micro-batch of {micro_batch} "
            f"on each of {world_size} ranks (needs at least {micro_batch * world_size}); use more "
            "data (data.path or data.builtin_size) or a smaller train_micro_batch_size_per_gpu"
        )
    mine = _permutation(num_examples, seed + epoch)[rank::world_size][:per_rank]
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(num_batches)]


def eval_batches(num_examples: int, micro_batch: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of the held-out set, in order: rank r takes examples r, r + world, ...
    Every rank returns the same number of lists; a rank short of examples gets empty ones at the end
    (the caller runs zero-weight dummy passes, so the ZeRO-3 gathers stay in step)."""
    mine = list(range(rank, num_examples, world_size))
    num_batches = math.ceil(math.ceil(num_examples / world_size) / micro_batch)
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(num_batches)]


def estimation_indices(num_samples: int, num_examples: int, seed: int) -> list[int]:
    """The examples of the estimation pass, whatever the world size: a seeded choice of num_samples."""
    if not 1 <= num_samples <= num_examples:
        raise ConfigError(
            f"lorasb.est_samples is {num_samples} but the dataset has {num_examples} examples; "
            f"set lorasb.est_samples between 1 and {num_examples} (or use a larger dataset)"
        )
    return _permutation(num_examples, seed)[:num_samples]


def fingerprint(examples: list[dict[str, list[int]]], indices: list[int]) -> str:
    """sha256 of the tokenized examples at ``indices`` (ids and labels), e.g. the estimation data."""
    digest = hashlib.sha256()
    for i in indices:
        digest.update(json.dumps([examples[i]["input_ids"], examples[i]["labels"]]).encode())
    return digest.hexdigest()


def estimation_batches(num_samples: int, num_examples: int, micro_batch: int, rank: int,
                       world_size: int, seed: int) -> list[list[int]]:
    """This rank's micro-batches for the gradient-estimation pass.

    ``num_samples`` examples are chosen by a seeded shuffle and dealt round-robin over the ranks.
    Every rank returns ``ceil(ceil(num_samples / world_size) / micro_batch)`` lists; a rank with
    fewer samples gets a shorter last list and then empty ones (the caller runs zero-weight dummy
    passes for those so the collectives stay in step).
    """
    mine = estimation_indices(num_samples, num_examples, seed)[rank::world_size]
    num_batches = math.ceil(math.ceil(num_samples / world_size) / micro_batch)
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(num_batches)]
