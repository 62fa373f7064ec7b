"""Data pipeline: synthetic rows, formats, sources, prompt masking, padding, per-rank sharding, samples."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import datasets
import pytest
import torch

import lorasb_ds.data as data_module
from lorasb_ds.config import ConfigError, DataConfig, load_run_config
from lorasb_ds.data import (
    ALPACA_INPUT_TEMPLATE,
    ALPACA_TEMPLATE,
    FORMATS,
    alpaca_prompt,
    collate,
    describe_truncation,
    estimation_batches,
    format_prompt,
    load_rows,
    render_rows,
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
    with pytest.raises(ConfigError, match=r"\.json, \.jsonl or \.parquet"):
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


# =========================================================================== formats, sources, samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "data", "samples")
SAMPLE_OF = {"metamath": "metamath.jsonl", "alpaca": "alpaca.jsonl", "commonsense": "commonsense.json",
             "chat": "chat.jsonl"}
CHAT_TEMPLATE = (  # a small template of our own: <s><|role|>\ncontent</s>\n per turn
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tok():
    t = tiny_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def sample_cfg(fmt, **kw):
    return DataConfig(path=os.path.join(SAMPLES, SAMPLE_OF[fmt]), format=fmt, **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def assert_masked(ex, n_prompt, tok, response):
    """labels are -100 exactly on the first n_prompt tokens; the rest is response + eos, learned."""
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == n_prompt + len(tok(response, add_special_tokens=False)["input_ids"]) + 1
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and -100 not in labels[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == response


# --------------------------------------------------------------------------- each format on its sample


INSTRUCTION_FORMATS = [f for f in FORMATS if f != "glue"]  # glue: tests/test_glue.py


@pytest.mark.parametrize("fmt", INSTRUCTION_FORMATS)
def test_sample_loads_and_masks_prompt(fmt, tok, chat_tok):
    cfg = sample_cfg(fmt)
    rows = load_rows(cfg, seed=0)
    assert 32 <= len(rows) <= 48
    t = chat_tok if fmt == "chat" else tok
    examples, truncated = tokenize_rows(rows, t, cfg)
    assert truncated == 0 and len(examples) == len(rows)  # the samples fit the default max_length
    rendered = render_rows(rows, cfg, t)
    for row, item, ex in zip(rows, rendered, examples):
        n_prompt = len(t(item["prompt"], add_special_tokens=fmt != "chat")["input_ids"])
        assert_masked(ex, n_prompt, t, item["response"])
        assert ex["input_ids"][0] == t.bos_token_id and ex["input_ids"][1] != t.bos_token_id
        if fmt == "metamath":
            assert item == {"prompt": format_prompt(row["query"], "alpaca"), "response": row["response"]}
        elif fmt in ("alpaca", "commonsense"):
            assert item["prompt"] == alpaca_prompt(row["instruction"], row["input"])
            assert item["response"] == row["output"]
        else:
            assert item["response"] == row["messages"][-1]["content"]
    # the same rows, the same examples
    assert tokenize_rows(load_rows(cfg, seed=1), t, cfg) == (examples, truncated)


def test_alpaca_prompt_with_and_without_input(tok):
    with_input = ("Below is an instruction that describes a task, paired with an input that provides "
                  "further context. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\nSort the numbers.\n\n### Input:\n3, 1, 2\n\n### Response:\n")
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert alpaca_prompt("Sort the numbers.", "3, 1, 2") == with_input
    assert ALPACA_INPUT_TEMPLATE.format(query="Sort the numbers.", input="3, 1, 2") == with_input
    for empty in ("", None, "  \n"):
        assert alpaca_prompt("Say hi.", empty) == no_input

    rows = datasets.Dataset.from_list([{"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
                                       {"instruction": "Say hi.", "input": "", "output": "hi"}])
    examples, _ = tokenize_rows(rows, tok, DataConfig(format="alpaca"))
    assert_masked(examples[0], len(tok(with_input)["input_ids"]), tok, "1, 2, 3")
    assert_masked(examples[1], len(tok(no_input)["input_ids"]), tok, "hi")
    # the sample has both kinds
    sample = load_rows(sample_cfg("alpaca"), 0)
    kinds = {bool(r["input"]) for r in sample}
    assert kinds == {True, False}


def test_alpaca_input_column_is_optional(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 3)
    cfg = DataConfig(path=path, format="alpaca")
    examples, _ = tokenize_rows(load_rows(cfg, 0), tok, cfg)
    assert_masked(examples[0], len(tok(alpaca_prompt("Say hi."))["input_ids"]), tok, "hi")


def test_commonsense_keeps_answer(tok):
    cfg = sample_cfg("commonsense")
    rows = load_rows(cfg, 0)
    examples, _ = tokenize_rows(rows, tok, cfg)
    rendered = render_rows(rows, cfg)
    answers = [r["answer"] for r in rows]
    assert [ex["answer"] for ex in examples] == [r["answer"] for r in rendered] == answers
    styles = {re.sub(r"\d+$", "", a) for a in answers}
    assert styles == {"true", "false", "solution", "option", "answer", "ending"}
    for row in rows:
        assert row["output"] == f"the correct answer is {row['answer']}"
        assert row["input"] == ""
        assert "Answer format: " in row["instruction"] and row["answer"] in row["instruction"].split(
            "Answer format: ")[1].split("/")
    # the file is one JSON list, as LLM-Adapters ships commonsense_170k.json
    assert isinstance(json.load(open(cfg.path)), list)
    # answers survive collation-free paths: fingerprint still covers ids and labels only
    assert set(examples[0]) == {"input_ids", "labels", "answer"}


def test_chat_prompt_is_template_up_to_last_assistant(chat_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I have 5."},
                {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "Add 2?"},
                {"role": "assistant", "content": "7."}]
    rows = datasets.Dataset.from_list([{"messages": messages}])
    cfg = DataConfig(format="chat")
    [item] = render_rows(rows, cfg, chat_tok)
    expected = ("<s><|system|>\nBe brief.</s>\n<|user|>\nI have 5.</s>\n<|assistant|>\nNoted.</s>\n"
                "<|user|>\nAdd 2?</s>\n<|assistant|>\n")
    assert item == {"prompt": expected, "response": "7."}
    [ex], truncated = tokenize_rows(rows, chat_tok, cfg)
    n_prompt = len(chat_tok(expected, add_special_tokens=False)["input_ids"])
    assert_masked(ex, n_prompt, chat_tok, "7.")
    assert ex["input_ids"].count(chat_tok.bos_token_id) == 1  # the template's <s>, not doubled
    # the earlier assistant turn is context (masked), only the last one is learned
    assert chat_tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]) == "7.</s>"


def test_chat_without_template(tok):
    rows = load_rows(sample_cfg("chat"), 0)
    with pytest.raises(ConfigError) as e:
        tokenize_rows(rows, tok, sample_cfg("chat"))
    msg = str(e.value)
    assert "data.format=chat" in msg and "chat template" in msg and "model.name_or_path" in msg


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], "last message must be"),
    ([{"role": "assistant", "content": "alone"}], "at least two"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "'content'"),
])
def test_chat_bad_rows(chat_tok, messages, needle):
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ds = datasets.Dataset.from_list([{"messages": good}, {"messages": messages}])
    with pytest.raises(ConfigError, match=needle) as e:
        render_rows(ds, DataConfig(format="chat"), chat_tok)
    assert "row 1 " in str(e.value) and "data.format=chat" in str(e.value)
    with pytest.raises(ConfigError, match="must be a list"):  # a column of text, not of turns
        render_rows(datasets.Dataset.from_dict({"messages": ["hello"]}), DataConfig(format="chat"), chat_tok)


@pytest.mark.parametrize("fmt, drop, rename", [
    ("alpaca", "output", None), ("alpaca", "instruction", None),
    ("commonsense", "answer", None), ("commonsense", "output", None),
    ("chat", "messages", "conversations"),
])
def test_missing_column_names_column_file_and_setting(tmp_path, fmt, drop, rename):
    rows = json.load(open(os.path.join(SAMPLES, SAMPLE_OF[fmt]))) if fmt == "commonsense" else \
        [json.loads(line) for line in open(os.path.join(SAMPLES, SAMPLE_OF[fmt]))]
    for r in rows:
        value = r.pop(drop)
        if rename:
            r[rename] = value
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        load_rows(DataConfig(path=path, format=fmt), 0)
    msg = str(e.value)
    assert f"no column '{drop}'" in msg and path in msg and f"data.format={fmt}" in msg


def test_wrong_format_gets_a_hint(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_rows(DataConfig(path=os.path.join(SAMPLES, "alpaca.jsonl")), 0)  # metamath by default
    msg = str(e.value)
    assert "no column 'query'" in msg and "data.query_field" in msg and "data.format=alpaca" in msg
    with pytest.raises(ConfigError, match="data.format=metamath"):
        load_rows(DataConfig(path=os.path.join(SAMPLES, "metamath.jsonl"), format="chat"), 0)
    with pytest.raises(ConfigError, match="fit data.format=commonsense"):
        load_rows(DataConfig(path=os.path.join(SAMPLES, "commonsense.json"), format="chat"), 0)


@pytest.mark.parametrize("fmt, row, column", [
    ("alpaca", {"instruction": "a", "input": "", "output": 3}, "'output'"),
    ("alpaca", {"instruction": ["a"], "input": "", "output": "b"}, "'instruction'"),
    ("commonsense", {"instruction": "a", "input": "", "output": "b", "answer": None}, "'answer'"),
])
def test_non_text_values(tok, fmt, row, column):
    with pytest.raises(ConfigError, match=f"row 0 .*{column}.*data.format={fmt}"):
        tokenize_rows(datasets.Dataset.from_list([row]), tok, DataConfig(format=fmt))


# --------------------------------------------------------------------------- sources


def test_parquet_file(tmp_path):
    path = str(tmp_path / "train.parquet")
    rows_of(PAIRS).to_parquet(path)
    ds = load_rows(DataConfig(path=path), 0)
    assert [r["query"] for r in ds] == [q for q, _ in PAIRS]


def test_directory_with_splits(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"query": "t", "response": "r"}] * 3)
    write_jsonl(d / "test.jsonl", [{"query": "e", "response": "r"}] * 2)
    assert len(load_rows(DataConfig(path=str(d)), 0)) == 3
    test = load_rows(DataConfig(path=str(d), split="test"), 0)
    assert len(test) == 2 and test[0]["query"] == "e"
    with pytest.raises(ConfigError) as e:
        load_rows(DataConfig(path=str(d), split="validation"), 0)
    assert "data.split 'validation'" in str(e.value) and str(d) in str(e.value)


def test_saved_to_disk_directory(tmp_path):
    d = str(tmp_path / "saved")
    datasets.DatasetDict({"train": rows_of(PAIRS), "test": rows_of(PAIRS[:1])}).save_to_disk(d)
    assert len(load_rows(DataConfig(path=d, split="test"), 0)) == 1
    with pytest.raises(ConfigError, match="no split 'dev'.*train, test"):
        load_rows(DataConfig(path=d, split="dev"), 0)


def test_single_file_takes_no_split(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": "q", "response": "r"}])
    for kw in ({"split": "test"}, {"subset": "main"}):
        with pytest.raises(ConfigError, match="single file"):
            load_rows(DataConfig(path=path, **kw), 0)
        with pytest.raises(ConfigError, match="single file"):
            load_run_config(None, [f"data.path={path}"] + [f"data.{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("path", ["./missing", "data/missing.jsonl", "~/nothing_here.json", "/abs/missing",
                                  "a/b/c", "missing.parquet", "has space/x"])
def test_missing_local_path_is_not_a_hub_name(path):
    with pytest.raises(ConfigError, match="no such file"):
        DataConfig(path=path).source_kind()
    with pytest.raises(ConfigError, match="data.path: no such file"):
        load_run_config(None, [f"data.path={path}"])


def test_hub_name_branch(monkeypatch):
    assert DataConfig(path="meta-math/MetaMathQA").source_kind() == "hub"
    assert DataConfig(path="gsm8k").source_kind() == "hub"
    load_run_config(None, ["data.path=openai/gsm8k", "data.subset=main", "data.split=test"])  # no network

    calls = []

    def fake_load_dataset(name, subset=None, split=None, **kw):
        calls.append((name, subset, split))
        if split == "empty":
            return datasets.Dataset.from_dict({"question": [], "answer": []})
        return datasets.Dataset.from_list([{"question": "1+1?", "answer": "2\n#### 2"}])

    monkeypatch.setattr(data_module.datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(path="openai/gsm8k", subset="main", split="test", query_field="question",
                     response_field="answer")
    assert len(load_rows(cfg, 0)) == 1 and calls == [("openai/gsm8k", "main", "test")]
    cfg.split = "empty"
    with pytest.raises(ConfigError, match=r"data.path 'openai/gsm8k' \(data.subset 'main', "
                                          r"data.split 'empty'\) is empty"):
        load_rows(cfg, 0)


def test_hub_offline_is_a_config_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as e:
        load_rows(DataConfig(path="meta-math/MetaMathQA"), 0)
    msg = str(e.value)
    assert "data.path 'meta-math/MetaMathQA'" in msg and "hub dataset" in msg and "offline" in msg
    assert "data.split 'train'" in msg


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("overrides, needle", [
    (["data.format=sharegpt"], "data.format must be"),
    (["data.format=alpaca"], "data.format=alpaca needs data.path"),
    ([f"data.path={SAMPLES}/alpaca.jsonl", "data.format=alpaca", "data.prompt_template=plain"],
     "data.prompt_template=plain applies to data.format=metamath only"),
    ([f"data.path={SAMPLES}/chat.jsonl", "data.format=chat", "data.response_field=reply"],
     "data.query_field/data.response_field apply to data.format=metamath only"),
    (["data.split="], "data.split is empty"),
])
def test_data_settings_validated(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_run_config(None, overrides)


def test_every_format_is_a_valid_setting():
    for fmt in INSTRUCTION_FORMATS:
        cfg = load_run_config(None, [f"data.path={SAMPLES}/{SAMPLE_OF[fmt]}", f"data.format={fmt}"])
        assert cfg.data.format == fmt


# --------------------------------------------------------------------------- truncation report


def test_describe_truncation(tok):
    assert describe_truncation(0, 512, 40, 40) == "no sample is longer than data.max_length=512 tokens (40 samples)"
    pairs = PAIRS + [("q", "7" * 300), ("x" * 400, "y")]
    rows = rows_of(pairs)
    cfg = DataConfig(prompt_template="plain", max_length=64)
    examples, truncated = tokenize_rows(rows, tok, cfg)
    line = describe_truncation(truncated, cfg.max_length, len(rows), len(examples))
    assert line == ("2 of 4 samples (50.0%) are longer than data.max_length=64 tokens and were cut; "
                    "1 of them were dropped, their prompt alone filling max_length; "
                    "raise data.max_length to keep them whole")


# --------------------------------------------------------------------------- the scripts


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_samples_regenerates_identical_files(tmp_path):
    make_samples = _load_script("make_samples")
    make_samples.main(["--out", str(tmp_path)])
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(os.listdir(SAMPLES)) == sorted(make_samples.SAMPLES)
    for name in names:
        fresh = (tmp_path / name).read_bytes()
        assert fresh == open(os.path.join(SAMPLES, name), "rb").read(), f"{name}: rerun scripts/make_samples.py"
        assert len(fresh) < 32_000


def test_gsm8k_test_sample_is_consistent():
    rows = [json.loads(line) for line in open(os.path.join(SAMPLES, "gsm8k_test.jsonl"))]
    assert 32 <= len(rows) <= 48
    for row in rows:
        assert set(row) == {"question", "answer"}
        *work, final = row["answer"].split("\n")
        m = re.fullmatch(r"#### (-?\d+)", final)
        assert m, row
        results = []
        for x, op, y, z in re.findall(r"<<(\d+)([-+*])(\d+)=(\d+)>>", row["answer"]):
            assert {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op] == int(z), row
            results.append(int(z))
        assert results and results[-1] == int(m.group(1)), row


def test_metamath_sample_answers_are_right():
    rows = [json.loads(line) for line in open(os.path.join(SAMPLES, "metamath.jsonl"))]
    assert {r["type"] for r in rows} == {"GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR", "MATH_AnsAug"}
    for row in rows:
        assert set(row) == {"query", "response", "type", "original_question"}
        assert re.search(r"\nThe answer is: -?\d+$", row["response"]), row
        # "a op b = c" steps (not the "x * b + c = d" equations of the unknown-variable rows)
        for x, op, y, z in re.findall(r"(?<![*x] )\b(\d+) ([-+*]) (\d+) = (\d+)", row["response"]):
            assert {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op] == int(z), row


def test_download_script_help_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "download_datasets.py"), "--help"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--only" in proc.stdout and "MetaMathQA" in proc.stdout and "GLUE" in proc.stdout
