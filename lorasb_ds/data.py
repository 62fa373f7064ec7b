"""Instruction data: rows, prompts, tokenization, padding, and which rank sees which example.

The pipeline, in order:

1. ``load_rows``: a ``datasets.Dataset`` with a query and a response column, read from a local
   ``.json``/``.jsonl`` file or, with no file named, built from ``synthetic_math_rows`` (small
   MetaMathQA-shaped arithmetic word problems, so a run needs no download).
2. ``tokenize_rows``: prompt + response + eos as token ids; the loss is masked (-100) on the prompt,
   so the model learns only to answer. Labels are *not* shifted: the HF model shifts them itself.
3. ``collate``: right-pads a micro-batch into ``(batch, seq)`` int64 tensors.
4. ``train_batches`` / ``estimation_batches``: lists of example indices for one rank. They are pure
   functions of (sizes, rank, world size, seed), so every rank computes its own share without any
   communication, and every rank gets the same number of micro-batches (a rank that ran one batch
   more than the others would hang in the next collective).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random

import datasets
import torch

from .config import ConfigError, DataConfig

IGNORE_INDEX = -100  # label value the HF cross-entropy skips

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:\n"
)


def format_prompt(query: str, template: str) -> str:
    """The text the model is conditioned on; the response follows it directly."""
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(query=query)
    if template == "plain":
        return query + "\n"
    raise ConfigError(f"data.prompt_template must be 'alpaca' or 'plain', got '{template}'")


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


def _is_blank(path: str) -> bool:
    """True when the file holds nothing but whitespace (reads only until the first real byte)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _check_columns(column_names: list[str], cfg: DataConfig, source: str) -> None:
    for setting, column in (("data.query_field", cfg.query_field),
                            ("data.response_field", cfg.response_field)):
        if column not in column_names:
            raise ConfigError(
                f"{source} has no column '{column}' (columns present: {', '.join(column_names)}); "
                f"set {setting} to the column that holds the "
                f"{'query' if setting == 'data.query_field' else 'response'}"
            )


def load_rows(cfg: DataConfig, seed: int) -> datasets.Dataset:
    """The raw rows, checked to have ``cfg.query_field`` and ``cfg.response_field`` columns."""
    if not cfg.path:
        rows = synthetic_math_rows(cfg.builtin_size, seed)
        # Built-in rows follow the configured column names, so tokenize_rows needs no special case.
        rows = [{cfg.query_field: r["query"], cfg.response_field: r["response"]} for r in rows]
        return datasets.Dataset.from_list(rows)

    path = cfg.path
    if not path.lower().endswith((".json", ".jsonl")):
        raise ConfigError(f"data.path '{path}': expected a .json or .jsonl file "
                          "(convert other formats to JSON Lines: one {\"query\": ..., \"response\": ...} per line)")
    if not os.path.isfile(path):
        raise ConfigError(f"data.path: no such file '{path}'")
    if _is_blank(path):
        raise ConfigError(f"data.path '{path}' is empty: it holds no rows")
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise ConfigError(f"data.path '{path}' could not be read as JSON/JSON Lines (is it empty or "
                          f"malformed?): {type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise ConfigError(f"data.path '{path}' is empty: it holds no rows")
    _check_columns(ds.column_names, cfg, f"data.path '{path}'")
    return ds


# --------------------------------------------------------------------------- tokenizing


def tokenize_rows(rows: datasets.Dataset, tokenizer, cfg: DataConfig) -> tuple[list[dict[str, list[int]]], int]:
    """Rows -> ``[{"input_ids", "labels"}]`` (same length each) and the number truncated.

    ``input_ids = prompt + response + [eos]``; ``labels`` is -100 on the prompt and equals
    ``input_ids`` on the rest. Both are cut to ``cfg.max_length``. A row whose prompt alone fills
    ``max_length`` has no label left to learn from (its loss would be 0/0); it is dropped, and
    counted among the truncated ones.
    """
    _check_columns(rows.column_names, cfg, "the dataset")
    queries, responses = list(rows[cfg.query_field]), list(rows[cfg.response_field])
    for i, (q, r) in enumerate(zip(queries, responses)):
        for setting, value in (("data.query_field", q), ("data.response_field", r)):
            if not isinstance(value, str):
                raise ConfigError(f"row {i}: the {setting} column holds {value!r}, not text; "
                                  "fix the row or point the setting at a text column")

    prompts = [format_prompt(q, cfg.prompt_template) for q in queries]
    prompt_ids = tokenizer(prompts)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]

    examples, truncated = [], 0
    for p, r in zip(prompt_ids, response_ids):
        r = r + [tokenizer.eos_token_id]
        input_ids = p + r
        labels = [IGNORE_INDEX] * len(p) + r
        if len(input_ids) > cfg.max_length:
            truncated += 1
            input_ids, labels = input_ids[: cfg.max_length], labels[: cfg.max_length]
            if len(p) >= cfg.max_length:
                continue
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, truncated


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels``, each (B, T) int64."""
    seq = max(len(ex["input_ids"]) for ex in examples)
    batch = len(examples)
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
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
