"""Data pipeline: synthetic rows, loading, prompt masking, padding and per-rank sharding."""

import json
import re

import datasets
import pytest
import torch

from lorasb_ds.config import ConfigError, DataConfig
from lorasb_ds.data import (
    ALPACA_TEMPLATE,
    collate,
    estimation_batches,
    format_prompt,
    load_rows,
    synthetic_math_rows,
    tokenize_rows,
    train_batches,
)
from lorasb_ds.modeling import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def rows_of(pairs, q="query", r="response"):
    return datasets.Dataset.from_list([{q: a, r: b} for a, b in pairs])


# --------------------------------------------------------------------------- prompts


def test_format_prompt():
    assert format_prompt("2+2?", "plain") == "2+2?\n"
    alpaca = format_prompt("2+2?", "alpaca")
    assert alpaca == ALPACA_TEMPLATE.replace("{query}", "2+2?")
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith("### Response:\n")
    with pytest.raises(ConfigError, match="data.prompt_template"):
        format_prompt("x", "chatml")


# --------------------------------------------------------------------------- synthetic rows

# Each template's query, solved here independently from the numbers in its text.
SOLVERS = [
    (r"has (\d+) \w+\. \w+ buys (\d+) bags with (\d+) \w+ each\.", lambda a, b, c: a + b * c),
    (r"had (\d+) \w+\. \w+ gave away (\d+) and then found (\d+) more\.", lambda a, b, c: a - b + c),
    (r"buys (\d+) \w+ at \$(\d+) each and pays with \$(\d+)\.", lambda a, b, c: c - a * b),
    (r"splits (\d+) \w+ equally among (\d+) friends\. Each friend then gets (\d+) more\.",
     lambda a, b, c: a // b + c),
    (r"reads (\d+) pages a day for (\d+) days, then (\d+) more pages\.", lambda a, b, c: a * b + c),
]


def solve(query):
    for pattern, f in SOLVERS:
        m = re.search(pattern, query)
        if m:
            return f(*map(int, m.groups())), pattern
    raise AssertionError(f"no template matches {query!r}")


def test_synthetic_rows_are_correct_and_short():
    rows = synthetic_math_rows(500, seed=3)
    seen_templates = set()
    for row in rows:
        assert set(row) == {"query", "response"}
        q, r = row["query"], row["response"]
        assert len(q) < 120 and len(r) < 120, row
        expected, pattern = solve(q)
        seen_templates.add(pattern)
        m = re.search(r"The answer is: (-?\d+)$", r)
        assert m and int(m.group(1)) == expected, row
        assert expected >= 0
        # every step "x op y = z" in the solution is itself correct
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r)
        assert len(steps) == 2, row
        for x, op, y, z in steps:
            x, y, z = int(x), int(y), int(z)
            assert {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op] == z, row
            if op == "/":
                assert x % y == 0, row
        assert int(steps[-1][3]) == expected
    assert len(seen_templates) == len(SOLVERS)
    assert len({row["query"] for row in rows}) > 400  # varied, not a handful of repeats


def test_synthetic_rows_deterministic():
    assert synthetic_math_rows(50, seed=7) == synthetic_math_rows(50, seed=7)
    assert synthetic_math_rows(50, seed=7) != synthetic_math_rows(50, seed=8)
    assert synthetic_math_rows(20, seed=7) == synthetic_math_rows(50, seed=7)[:20]


# --------------------------------------------------------------------------- loading


PAIRS = [("What is 2+3?", "2 + 3 = 5. The answer is: 5"), ("What is 4*2?", "The answer is: 8")]


def test_load_rows_builtin():
    ds = load_rows(DataConfig(builtin_size=30), seed=1)
    assert len(ds) == 30 and set(ds.column_names) == {"query", "response"}
    assert ds[0] == synthetic_math_rows(30, seed=1)[0]
    renamed = load_rows(DataConfig(builtin_size=5, query_field="q", response_field="a"), seed=1)
    assert set(renamed.column_names) == {"q", "a"}


def test_load_rows_jsonl_and_json(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    rows_of(PAIRS, "instruction", "output").to_json(str(jsonl), lines=True)
    ds = load_rows(DataConfig(path=str(jsonl), query_field="instruction", response_field="output"), 0)
    assert len(ds) == 2 and ds[1]["output"] == "The answer is: 8"

    js = tmp_path / "train.json"
    js.write_text(json.dumps([{"query": q, "response": r, "extra": 1} for q, r in PAIRS]))
    ds = load_rows(DataConfig(path=str(js)), 0)
    assert [row["query"] for row in ds] == [q for q, _ in PAIRS]


def test_load_rows_missing_column(tmp_path):
    path = tmp_path / "train.jsonl"
    rows_of(PAIRS, "question", "response").to_json(str(path), lines=True)
    with pytest.raises(ConfigError) as e:
        load_rows(DataConfig(path=str(path)), 0)
    msg = str(e.value)
    assert "'query'" in msg and "data.query_field" in msg and str(path) in msg
    assert "question" in msg and "response" in msg  # the columns that are there

    rows_of(PAIRS, "query", "answer").to_json(str(path), lines=True)
    with pytest.raises(ConfigError, match="data.response_field"):
        load_rows(DataConfig(path=str(path)), 0)


def test_load_rows_empty_and_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty") as e:
        load_rows(DataConfig(path=str(empty)), 0)
    assert str(empty) in str(e.value)

    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    with pytest.raises(ConfigError) as e:
        load_rows(DataConfig(path=str(empty_list)), 0)
    assert str(empty_list) in str(e.value)

    csv = tmp_path / "train.csv"
    csv.write_text("query,response\na,b\n")
    with pytest.raises(ConfigError, match=r"\.json or \.jsonl"):
        load_rows(DataConfig(path=str(csv)), 0)

    with pytest.raises(ConfigError, match="no such file"):
        load_rows(DataConfig(path=str(tmp_path / "missing.jsonl")), 0)


# --------------------------------------------------------------------------- tokenizing


def test_tokenize_masks_prompt(tok):
    for template in ("alpaca", "plain"):
        cfg = DataConfig(prompt_template=template)
        examples, truncated = tokenize_rows(rows_of(PAIRS), tok, cfg)
        assert truncated == 0 and len(examples) == 2
        for (q, r), ex in zip(PAIRS, examples):
            ids, labels = ex["input_ids"], ex["labels"]
            n_prompt = len(tok(format_prompt(q, template))["input_ids"])  # includes <s>
            assert len(ids) == len(labels) == n_prompt + len(r) + 1
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert labels[:n_prompt] == [-100] * n_prompt
            assert labels[n_prompt:] == ids[n_prompt:]
            assert tok.decode(ids[n_prompt:-1]) == r


def test_tokenize_truncates_and_counts(tok):
    long_response = "7" * 300
    pairs = PAIRS + [("q", long_response), ("x" * 400, "y")]
    cfg = DataConfig(prompt_template="plain", max_length=64)
    examples, truncated = tokenize_rows(rows_of(pairs), tok, cfg)
    assert truncated == 2
    # the row whose prompt alone exceeds max_length has nothing to learn and is dropped
    assert len(examples) == 3
    long = examples[2]
    assert len(long["input_ids"]) == len(long["labels"]) == 64
    assert long["labels"][:3] == [-100] * 3 and long["labels"][3:] == long["input_ids"][3:]
    assert all(len(ex["input_ids"]) <= 64 for ex in examples)


def test_tokenize_rejects_non_text(tok):
    ds = datasets.Dataset.from_list([{"query": "a", "response": None}])
    with pytest.raises(ConfigError, match="data.response_field"):
        tokenize_rows(ds, tok, DataConfig())


def test_collate_pads_right(tok):
    examples, _ = tokenize_rows(rows_of(PAIRS), tok, DataConfig(prompt_template="plain"))
    batch = collate(examples, pad_token_id=tok.pad_token_id)
    lengths = [len(ex["input_ids"]) for ex in examples]
    shape = (2, max(lengths))
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == shape and batch[key].dtype == torch.int64
    for i, (ex, n) in enumerate(zip(examples, lengths)):
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["labels"][i, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (shape[1] - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == -100).all()
    assert min(lengths) < max(lengths)  # the test really padded something


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n,mb,world", [(10, 1, 1), (10, 3, 1), (101, 4, 3), (17, 2, 4), (64, 8, 8),
                                        (9, 3, 3), (100, 7, 2)])
def test_train_batches_equal_and_disjoint(n, mb, world):
    per_rank = [train_batches(n, mb, r, world, epoch=0, seed=5) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert counts == {(n // world) // mb}
    flat = [i for batches in per_rank for b in batches for i in b]
    assert all(len(b) == mb for batches in per_rank for b in batches)
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))


def test_train_batches_epochs_and_determinism():
    a0 = train_batches(200, 4, 1, 2, epoch=0, seed=42)
    assert a0 == train_batches(200, 4, 1, 2, epoch=0, seed=42)
    a1 = train_batches(200, 4, 1, 2, epoch=1, seed=42)
    assert a0 != a1
    assert a0 != train_batches(200, 4, 1, 2, epoch=0, seed=43)
    # one epoch on one rank visits every example once
    full = train_batches(12, 3, 0, 1, epoch=3, seed=0)
    assert sorted(i for b in full for i in b) == list(range(12))


def test_train_batches_too_small():
    with pytest.raises(ConfigError) as e:
        train_batches(7, 4, 0, 2, epoch=0, seed=0)
    msg = str(e.value)
    assert "7" in msg and "4" in msg and "2" in msg


@pytest.mark.parametrize("samples,n,mb,world", [(50, 200, 3, 1), (50, 200, 3, 4), (5, 10, 2, 4),
                                                (3, 3, 1, 5), (10, 10, 4, 3), (1, 1, 3, 2)])
def test_estimation_batches(samples, n, mb, world):
    per_rank = [estimation_batches(samples, n, mb, r, world, seed=9) for r in range(world)]
    expected = -(-(-(-samples // world)) // mb)  # ceil(ceil(samples / world) / mb)
    assert all(len(b) == expected for b in per_rank)
    assert all(len(b) <= mb for batches in per_rank for b in batches)
    flat = [i for batches in per_rank for b in batches for i in b]
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(9))[:samples].tolist()
    assert sorted(flat) == sorted(chosen)  # each chosen sample exactly once, nothing else
    assert per_rank == [estimation_batches(samples, n, mb, r, world, seed=9) for r in range(world)]


def test_estimation_batches_short_ranks_get_empty_lists():
    # 5 samples over 4 ranks: rank 0 gets 2, ranks 1-3 get 1 each; micro-batch 1 -> 2 lists each
    per_rank = [estimation_batches(5, 20, 1, r, 4, seed=0) for r in range(4)]
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]
    assert all(len(b) == 1 for b in per_rank[0])
    for r in (1, 2, 3):
        assert len(per_rank[r][0]) == 1 and per_rank[r][1] == []
    # more ranks than samples: a rank can have nothing at all
    assert estimation_batches(2, 20, 2, 3, 4, seed=0) == [[]]


def test_estimation_batches_bad_sizes():
    with pytest.raises(ConfigError, match="lorasb.est_samples") as e:
        estimation_batches(60, 50, 3, 0, 1, seed=0)
    assert "50" in str(e.value)
    with pytest.raises(ConfigError, match="lorasb.est_samples"):
        estimation_batches(0, 50, 3, 0, 1, seed=0)
