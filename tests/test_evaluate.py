"""Evaluation: answer extraction and scoring (scoring.py) by hand-checked cases, apply_adapter, and
`lorasb eval` end to end on the built-in tiny model, in one process and sharded over two."""

import json
import os
import sys
from fractions import Fraction

import pytest
import torch

from conftest import REPO, mpirun_cmd, run_command, torchrun_cmd
from lorasb_ds import evaluate as ev
from lorasb_ds import scoring
from lorasb_ds.cli import EVAL_MAX_NEW_TOKENS, EVAL_TASKS
from lorasb_ds.cli import main as cli_main
from lorasb_ds.config import ConfigError
from lorasb_ds.data import ALPACA_TEMPLATE, alpaca_prompt, format_prompt
from lorasb_ds.export import apply_adapter
from lorasb_ds.layer import LoRASBLinear
from lorasb_ds.modeling import tiny_llama
from test_export import write_adapter

# --------------------------------------------------------------------------- numbers and GSM8K


def test_scoring_imports_without_torch():
    """Answer scoring and GLUE's metrics load without torch (a scoring change needs no model)."""
    code = "import sys, lorasb_ds.scoring, lorasb_ds.glue; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    out = run_command([sys.executable, "-c", code]).stdout.strip().splitlines()[-1]
    assert out == "[]"


# (generation, gold, strict prediction, strict correct, flexible prediction, flexible correct)
GSM8K_CASES = [
    ("She has 5 + 3 = 8 apples.\nThe answer is: 8", "8", "8", True, "8", True),
    ("The answer is: 1,234", "1234", "1234", True, "1234", True),
    ("Total 1,000,000 cells. The answer is: 1,000,000.", "1000000", "1000000", True, "1000000", True),
    ("It drops by 7.\nThe answer is: -7", "-7", "-7", True, "-7", True),
    ("The answer is: 3.50", "3.5", "3.5", True, "3.5", True),
    ("The answer is: 3/4", "0.75", "0.75", True, "0.75", True),
    ("The answer is: 3/4.", "3/4", "0.75", True, "0.75", True),
    ("She pays $18. The answer is: $18.", "18", "18", True, "18", True),
    ("The answer is: 25%", "25", "25", True, "25", True),
    ("The answer is: 12\nWait, 12 + 30 = 42.\nThe answer is: 42", "42", "42", True, "42", True),
    ("The answer is: 42\nThe answer is: 12", "42", "12", False, "12", False),  # the last marker wins
    ("3 + 4 = 7 so she has 7 left", "7", None, False, "7", True),  # no marker: strict has no prediction
    ("He had 5 apples. The answer is: seventy-two", "72", None, False, "5", False),  # number words
    ("The answer is: 72 dollars, or 7200 cents", "72", "72", True, "7200", False),  # first after marker
    ("The answer is:72", "72", "72", True, "72", True),
    ("The answer is :  72", "72", "72", True, "72", True),
    ("the answer is: 72", "72", None, False, "72", True),  # the marker is case-sensitive
    ("The answer is: 10.0", "10", "10", True, "10", True),
    ("The answer is: 0.33", "1/3", "0.33", False, "0.33", False),  # exact: 0.33 != 1/3
    ("It is 20 - 5 = 15.", "15", None, False, "15", True),
    ("Difference 5-3, so x = -2", "-2", None, False, "-2", True),  # '5-3' is 5 and 3, '-2' is negative
    ("The answer is: -$5", "-5", "-5", True, "-5", True),
    ("The answer is: .5", "0.5", "0.5", True, "0.5", True),
    ("", "3", None, False, None, False),
    # GSM8K's own final-answer marker, as a model trained on openai/gsm8k's answers writes it
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72", "72", True, "72", True),
    ("5 * 12 = 60\n####60", "60", "60", True, "60", True),
    ("#### 7\nThe answer is: 8", "7", "8", False, "8", False),  # the last marker of either kind wins
    ("The answer is: 8\n#### 7", "7", "7", True, "7", True),
    ("#### seven", "7", None, False, None, False),
]


@pytest.mark.parametrize("generation,gold,strict,strict_ok,flexible,flexible_ok", GSM8K_CASES)
def test_gsm8k_scoring(generation, gold, strict, strict_ok, flexible, flexible_ok):
    value = scoring.parse_number(gold)
    example = scoring.Example(0, "q", "p", scoring.format_number(value), gold_value=value)
    got = scoring.score("gsm8k", generation, example)
    assert got == {"prediction_strict": strict, "prediction_flexible": flexible,
                   "correct_strict": strict_ok, "correct_flexible": flexible_ok}


@pytest.mark.parametrize("text,numbers", [
    ("1,234 and 12,34", [1234, 12, 34]),  # a thousands group has exactly three digits
    ("3.50 3.5. 3/4 -7 +2 \u22124", [Fraction(7, 2), Fraction(7, 2), Fraction(3, 4), -7, 2, -4]),
    ("x-3 (-3) a=-3", [3, -3, -3]),  # a sign glued to a word is a hyphen, not a minus
    ("$18.00, 50%, 3/0", [18, 50, 3]),  # a zero denominator leaves the numerator
    ("no digits at all", []),
])
def test_find_numbers(text, numbers):
    assert scoring.find_numbers(text) == [Fraction(n) for n in numbers]


@pytest.mark.parametrize("answer,gold", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("... so 1,200 + 34 = 1,234\n#### 1,234", "1234"),
    ("#### -3", "-3"),
    ("#### 2.50", "2.5"),
    ("first #### 1 then #### 5", "5"),  # the last '####'
    ("72", "72"),  # a bare gold string
    (" $1,000. ", "1000"),
    (18, "18"),  # a number column
])
def test_gsm8k_gold(answer, gold):
    assert scoring.format_number(scoring.gsm8k_gold(answer)) == gold


@pytest.mark.parametrize("answer", ["a solution without the marker", "#### none", "seventy-two"])
def test_gsm8k_gold_missing(answer):
    with pytest.raises(ValueError):
        scoring.gsm8k_gold(answer)


def test_format_number():
    cases = {Fraction(1234): "1234", Fraction(-7, 2): "-3.5", Fraction(1, 20): "0.05", Fraction(-1, 20): "-0.05",
             Fraction(1, 3): "1/3", Fraction(0): "0"}
    assert {v: scoring.format_number(v) for v in cases} == cases
    assert scoring.format_number(None) is None


# --------------------------------------------------------------------------- MATH


@pytest.mark.parametrize("generation,gold,strict,strict_ok,flexible_ok", [
    ("So the value is half.\nThe answer is: \\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}", True, False),
    ("The answer is: $\\dfrac{1}{2}$.", "\\frac{1}{2}", "\\dfrac{1}{2}", True, False),
    ("The answer is: 0.5", "\\frac{1}{2}", "0.5", True, True),  # numeric equality
    ("The answer is: \\frac12", "\\frac{1}{2}", "\\frac12", True, False),
    ("The answer is: x = 5\nmore text 7", "5", "x = 5", True, False),
    ("The answer is: 90^\\circ", "90", "90^\\circ", True, True),
    ("The answer is: 1,000", "1000", "1,000", True, True),
    ("The answer is: \\sqrt{3}", "\\sqrt{2}", "\\sqrt{3}", False, False),
    ("The answer is: (2, 3)", "(2,3)", "(2, 3)", True, False),  # a tuple has no value: flexible fails
    ("The answer is: -\\frac{3}{4}", "-0.75", "-\\frac{3}{4}", True, False),
    ("It is 12", "12", None, False, True),
])
def test_math_scoring(generation, gold, strict, strict_ok, flexible_ok):
    example = scoring.Example(0, "q", "p", gold, gold_value=scoring.math_value(gold))
    got = scoring.score("math", generation, example)
    assert (got["prediction_strict"], got["correct_strict"]) == (strict, strict_ok)
    assert got["correct_flexible"] == flexible_ok


def test_math_gold():
    assert scoring.math_gold({"problem": "p", "answer": " 7 "}) == "7"
    solution = "First \\boxed{3}. Then $x = \\boxed{\\frac{a^{2}}{b}}$."
    assert scoring.math_gold({"problem": "p", "solution": solution}) == "\\frac{a^{2}}{b}"
    assert scoring.math_gold({"problem": "p", "solution": "so \\fbox{12}"}) == "12"
    assert scoring.math_gold({"problem": "p", "answer": "", "solution": "\\boxed 5$"}) == "5"
    with pytest.raises(ValueError):
        scoring.math_gold({"problem": "p", "solution": "no box here"})
    assert scoring.math_value("\\frac{3}{4}") == Fraction(3, 4) and scoring.math_value("\\sqrt{2}") is None


# --------------------------------------------------------------------------- commonsense


@pytest.mark.parametrize("generation,gold,strict,flexible", [
    ("the correct answer is answer3", "answer3", "answer3", "answer3"),
    ("answer2 looks wrong; answer5 is right", "answer5", "answer2", "answer5"),  # first found counts
    ("the correct answer is answer12", "answer1", None, None),  # not a whole token
    ("the correct answer is option1", "option1", "option1", "option1"),
    ("option2.", "option1", "option2", "option2"),
    ("the correct answer is solution2", "solution2", "solution2", "solution2"),
    ("ending4, not ending1", "ending4", "ending4", "ending1"),
    ("the correct answer is true", "true", "true", "true"),
    ("the correct answer is false because it is untrue", "false", "false", "false"),
    ("The answer is True", "true", None, None),  # case-sensitive, as the datasets write the tokens
    ("answer1 option1", "option2", "option1", "option1"),  # only the gold's family is looked for
    ("I do not know", "answer1", None, None),
])
def test_commonsense_scoring(generation, gold, strict, flexible):
    example = scoring.Example(0, "q", "p", gold, family=scoring.commonsense_family(gold))
    got = scoring.score("commonsense", generation, example)
    assert got == {"prediction_strict": strict, "prediction_flexible": flexible,
                   "correct_strict": strict == gold, "correct_flexible": flexible == gold}


def test_commonsense_families():
    assert {g: scoring.commonsense_family(g) for g in ("answer5", "option2", "solution1", "ending3", "false")} == {
        "answer5": "answer", "option2": "option", "solution1": "solution", "ending3": "ending",
        "false": "true/false"}
    for bad in ("answer6", "ending0", "True", "B"):
        with pytest.raises(ValueError):
            scoring.commonsense_family(bad)


# --------------------------------------------------------------------------- prompts and data


def test_prompts(tmp_path):
    prompt = ev.math_prompt("What is 2 + 3?")
    assert prompt == ALPACA_TEMPLATE.format(query="What is 2 + 3?").removesuffix("\n") + \
        " Let's think step by step."
    assert prompt.endswith("### Instruction:\nWhat is 2 + 3?\n\n### Response: Let's think step by step.")
    path = tmp_path / "cs.jsonl"
    rows = [{"instruction": "Pick one.", "input": "", "answer": "option1"},
            {"instruction": "Pick one.", "input": "Context here.", "answer": "answer2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = ev.load_examples("commonsense", str(path))
    assert examples[0].prompt == format_prompt("Pick one.", "alpaca")
    assert examples[1].prompt == alpaca_prompt("Pick one.", "Context here.")  # the training prompt
    assert "### Input:\nContext here." in examples[1].prompt
    assert [(e.gold, e.family) for e in examples] == [("option1", "option"), ("answer2", "answer")]


@pytest.mark.parametrize("template", ["alpaca", "plain", "chat"])
def test_eval_prompt_is_the_training_prompt_of_the_row(template, tmp_path):
    """One prompt both ways: what `lorasb eval --prompt_template T` generates from for a GSM8K row is the
    prompt that training with data.prompt_template=T built for the same question, token for token."""
    from lorasb_ds.config import DataConfig
    from lorasb_ds.data import load_rows, tokenize_rows
    from lorasb_ds.modeling import tiny_tokenizer
    from test_data import CHAT_TEMPLATE

    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS[:3]))
    cfg = DataConfig(path=str(path), query_field="question", response_field="answer", prompt_template=template)
    training, _ = tokenize_rows(load_rows(cfg, 0), tok, cfg)
    for example, row in zip(ev.load_examples("gsm8k", str(path)), training):
        prompt = ev.eval_prompt(example, template, tok)
        ids = tok(prompt, add_special_tokens=template != "chat")["input_ids"]
        n_prompt = row["labels"].index(next(x for x in row["labels"] if x != -100))
        assert ids == row["input_ids"][:n_prompt]
        assert prompt.endswith({"alpaca": "### Response:\n", "plain": "\n", "chat": "<|assistant|>\n"}[template])
    if template == "chat":
        assert ids.count(tok.bos_token_id) == 1  # the template's <s>, not one more from the tokenizer


def test_eval_prompt_template_checks(e2e, capsys):
    args = ["eval", *EVAL_ARGS, "--data", e2e["data"], "--adapter", e2e["adapter"], "--out", str(e2e["root"] / "x")]
    assert cli_main([*args, "--prompt_template", "chat"]) == 2  # the built-in tokenizer has no chat template
    assert "--prompt_template chat needs a tokenizer with a chat template" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="applies to --task gsm8k and math only"):
        ev.check_settings(ev.EvalSettings(task="commonsense", data=e2e["data"], adapter=None, out="o",
                                          prompt_template="plain"))
    assert not (e2e["root"] / "x").exists()


def test_cli_constants_match():
    assert EVAL_TASKS == scoring.TASKS and EVAL_MAX_NEW_TOKENS == ev.DEFAULT_MAX_NEW_TOKENS == 256
    from lorasb_ds.cli import EVAL_PROMPT_TEMPLATES

    assert EVAL_PROMPT_TEMPLATES == ev.EVAL_PROMPT_TEMPLATES


# --------------------------------------------------------------------------- apply_adapter


@torch.no_grad()
def test_apply_adapter_matches_hand_wrapped(tmp_path):
    ids = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    base_logits = tiny_llama().eval()(input_ids=ids).logits
    by_hand = tiny_llama()
    write_adapter(by_hand, tmp_path / "adapter")  # wraps by_hand and writes the files
    applied = tiny_llama()
    layers = apply_adapter(applied, str(tmp_path / "adapter"))
    assert len(layers) == 28 and all(isinstance(m, LoRASBLinear) for m in layers.values())
    assert all(applied.get_submodule(n) is m for n, m in layers.items())
    expected = by_hand.eval()(input_ids=ids).logits
    got = applied.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert float((got - base_logits).abs().max()) > 1e-2  # the adapter changes the model


def test_apply_adapter_refuses_other_model(tmp_path):
    write_adapter(tiny_llama(), tmp_path / "adapter")
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError, match="builtin:tiny-llama"):
        apply_adapter(other, str(tmp_path / "adapter"))
    assert not any(isinstance(m, LoRASBLinear) for m in other.modules())  # checked before touching it
    with pytest.raises(ConfigError, match="no file"):
        apply_adapter(tiny_llama(), str(tmp_path))


# --------------------------------------------------------------------------- end to end

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
    {"question": "A shop sold 1,200 pens on Monday and 34 on Tuesday. How many pens were sold in all?",
     "answer": "1,200 + 34 = 1,234\n#### 1,234"},
    {"question": "Half of 9?", "answer": "#### 4.5"},
    {"question": "Ann had 10 dollars and spent 17. What is her balance?", "answer": "10 - 17 = -7\n#### -7"},
    {"question": "Sum of 1 and 1?", "answer": "2"},
]
GOLDS = ["7", "42", "1234", "4.5", "-7", "2"]
EVAL_ARGS = ["--task", "gsm8k", "--max_new_tokens", "8"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_adapter(tiny_llama(), root / "adapter")
    data = root / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    out = root / "single"
    code = cli_main(["eval", *EVAL_ARGS, "--data", str(data), "--adapter", str(root / "adapter"),
                     "--out", str(out), "--batch_size", "4"])
    assert code == 0
    return {"root": root, "data": str(data), "adapter": str(root / "adapter"), "out": out}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_eval_outputs(e2e):
    out = e2e["out"]
    assert sorted(os.listdir(out)) == ["generations.jsonl", "summary.json"]
    rows = read_jsonl(out / "generations.jsonl")
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["gold"] for r in rows] == GOLDS
    keys = {"index", "prompt", "generation", "gold", "prediction_strict", "prediction_flexible",
            "correct_strict", "correct_flexible"}
    for row, src in zip(rows, GSM8K_ROWS):
        assert set(row) == keys
        assert row["prompt"] == ev.math_prompt(src["question"])
        assert isinstance(row["generation"], str)
        example = scoring.Example(row["index"], src["question"], row["prompt"], row["gold"],
                             gold_value=scoring.parse_number(row["gold"]))
        scored = {k: row[k] for k in keys if k.startswith(("prediction", "correct"))}
        assert scoring.score("gsm8k", row["generation"], example) == scored
    assert all(r["generation"].strip() for r in rows)  # the model produced text for every prompt

    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["rows"] == 6
    assert summary["correct_strict"] == sum(r["correct_strict"] for r in rows)
    assert summary["correct_flexible"] == sum(r["correct_flexible"] for r in rows)
    assert summary["no_prediction_strict"] == sum(r["prediction_strict"] is None for r in rows)
    assert summary["accuracy_strict"] == summary["correct_strict"] / 6
    assert summary["accuracy_flexible"] == summary["correct_flexible"] / 6
    assert summary["model"] == "builtin:tiny-llama" and summary["adapter"] == os.path.abspath(e2e["adapter"])
    assert summary["r"] == 4 and summary["adapter_init_id"]
    assert summary["max_new_tokens"] == 8 and summary["batch_size"] == 4 and summary["world_size"] == 1
    assert summary["device"] == "cpu" and summary["dtype"] == "float32" and summary["decoding"] == "greedy"
    assert summary["seconds"] > 0


def test_eval_without_adapter_is_the_base_model(e2e, tmp_path):
    """No --adapter: the base model alone (a zero-shot baseline): the generations of the unwrapped model."""
    from lorasb_ds.modeling import tiny_tokenizer

    out = tmp_path / "base"
    assert cli_main(["eval", *EVAL_ARGS, "--data", e2e["data"], "--out", str(out), "--batch_size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] is None and summary["method"] is None and summary["rows"] == len(GSM8K_ROWS)
    rows = read_jsonl(out / "generations.jsonl")
    tok = tiny_tokenizer()
    tok.pad_token, tok.padding_side = tok.eos_token if tok.pad_token is None else tok.pad_token, "left"
    expected = ev.generate(tiny_llama().eval(), tok, [r["prompt"] for r in rows], 8, 4, torch.device("cpu"))
    assert [r["generation"] for r in rows] == expected
    adapted = read_jsonl(e2e["out"] / "generations.jsonl")
    assert [r["generation"] for r in rows] != [r["generation"] for r in adapted]  # the adapter does change them


def test_eval_batch_size_does_not_change_generations(e2e):
    out = e2e["root"] / "batch1"
    assert cli_main(["eval", *EVAL_ARGS, "--data", e2e["data"], "--adapter", e2e["adapter"], "--out", str(out),
                     "--batch_size", "1", "--limit", "5"]) == 0
    single = read_jsonl(e2e["out"] / "generations.jsonl")
    assert read_jsonl(out / "generations.jsonl") == single[:5]
    assert json.loads((out / "summary.json").read_text())["rows"] == 5


def test_several_data_files_in_one_call_score_as_each_alone(e2e, tmp_path):
    """--data A B --out X Y: the model is loaded once and each file is scored into its own directory, with
    the generations and scores of A alone and of B alone."""
    first3 = tmp_path / "first3.jsonl"
    first3.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS[:3]))
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert cli_main(["eval", *EVAL_ARGS, "--data", e2e["data"], str(first3), "--adapter", e2e["adapter"],
                     "--out", str(both / "all"), str(both / "first3"), "--batch_size", "4"]) == 0
    assert cli_main(["eval", *EVAL_ARGS, "--data", str(first3), "--adapter", e2e["adapter"], "--out", str(alone),
                     "--batch_size", "4"]) == 0
    assert (both / "all" / "generations.jsonl").read_bytes() == (e2e["out"] / "generations.jsonl").read_bytes()
    assert (both / "first3" / "generations.jsonl").read_bytes() == (alone / "generations.jsonl").read_bytes()
    for name, reference in (("all", e2e["out"]), ("first3", alone)):
        summary = json.loads((both / name / "summary.json").read_text())
        expected = json.loads((reference / "summary.json").read_text())
        assert summary["data"] == expected["data"] and summary["rows"] == expected["rows"]
        assert summary["correct_strict"] == expected["correct_strict"]


def test_limit_per_data_file(e2e, tmp_path):
    """--limit 4 2: the first 4 rows of A and the first 2 of B, as each file alone would give them."""
    first3 = tmp_path / "first3.jsonl"
    first3.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS[:3]))
    assert cli_main(["eval", *EVAL_ARGS, "--data", e2e["data"], str(first3), "--adapter", e2e["adapter"],
                     "--out", str(tmp_path / "a"), str(tmp_path / "b"), "--limit", "4", "2"]) == 0
    every_row = read_jsonl(e2e["out"] / "generations.jsonl")
    for name, limit in (("a", 4), ("b", 2)):
        assert read_jsonl(tmp_path / name / "generations.jsonl") == every_row[:limit]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["rows"] == summary["limit"] == limit


def launcher_cmd(launcher: str, script: str) -> list[str]:
    return {"torchrun": torchrun_cmd, "mpirun": mpirun_cmd}[launcher](script)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_eval_sharded_matches_single_process(e2e, launcher):
    """Rows sharded over 2 ranks give the single process's outputs; a second data file in the same launch
    (the first 5 rows) gives the first 5 rows' outputs."""
    out, out5 = e2e["root"] / f"sharded-{launcher}", e2e["root"] / f"sharded5-{launcher}"
    first5 = e2e["root"] / "first5.jsonl"
    first5.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS[:5]))
    cmd = [*launcher_cmd(launcher, os.path.join(REPO, "launch", "evaluate.py")), *EVAL_ARGS,
           "--data", e2e["data"], str(first5), "--adapter", e2e["adapter"], "--out", str(out), str(out5),
           "--batch_size", "2"]
    run_command(cmd, timeout=300)
    single = (e2e["out"] / "generations.jsonl").read_bytes()
    assert (out / "generations.jsonl").read_bytes() == single
    assert read_jsonl(out5 / "generations.jsonl") == read_jsonl(e2e["out"] / "generations.jsonl")[:5]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rows"] == 6
    reference = json.loads((e2e["out"] / "summary.json").read_text())
    for key in ("correct_strict", "correct_flexible", "accuracy_strict", "accuracy_flexible"):
        assert summary[key] == reference[key]


# --------------------------------------------------------------------------- errors (exit code 2)


def run_cli_error(capsys, args):
    code = cli_main(["eval", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_eval_errors(e2e, tmp_path, capsys):
    base = ["--task", "gsm8k", "--adapter", e2e["adapter"], "--out", str(tmp_path / "o")]
    err = run_cli_error(capsys, [*base, "--data", str(tmp_path / "missing.jsonl")])
    assert "no such file" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"query": "q", "response": "r"}) + "\n")
    err = run_cli_error(capsys, [*base, "--data", str(wrong)])
    assert "'question'" in err and "columns present: query, response" in err
    bad_gold = tmp_path / "bad.jsonl"
    bad_gold.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n"
                        + json.dumps({"question": "q", "answer": "no marker here"}) + "\n")
    err = run_cli_error(capsys, [*base, "--data", str(bad_gold)])
    assert "row 0" in err and "gold" in err
    err = run_cli_error(capsys, ["--task", "commonsense", "--data", e2e["data"], "--adapter", e2e["adapter"],
                                 "--out", str(tmp_path / "o")])
    assert "'instruction'" in err
    err = run_cli_error(capsys, [*base[:2], "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                                 "--data", e2e["data"]])
    assert "--adapter" in err and "no such directory" in err
    err = run_cli_error(capsys, [*base[:2], "--adapter", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--data", e2e["data"]])
    assert "lorasb_adapter.safetensors" in err
    err = run_cli_error(capsys, [*base, "--data", e2e["data"], "--batch_size", "0"])
    assert "--batch_size" in err
    err = run_cli_error(capsys, [*base, "--data", e2e["data"], e2e["data"]])
    assert "--data names 2 file(s) but --out 1" in err
    err = run_cli_error(capsys, [*base[:4], "--out", str(tmp_path / "o"), str(tmp_path / "o"),
                                 "--data", e2e["data"], e2e["data"]])
    assert "a directory named twice" in err
    err = run_cli_error(capsys, [*base[:4], "--out", str(tmp_path / "o"), str(tmp_path / "p"),
                                 "--data", e2e["data"], e2e["data"], "--limit", "1", "2", "3"])
    assert "--data names 2 file(s) but --limit gives 3 numbers" in err
    err = run_cli_error(capsys, [*base, "--data", e2e["data"], "--limit", "-1"])
    assert "--limit must be at least 0" in err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "p")  # nothing was written


def test_eval_model_directory_and_misfit(e2e, tmp_path, capsys):
    """--model DIR loads through from_pretrained (same generations as the built-in model); an adapter that
    does not fit the model fails inside the evaluation, through the gathering of errors, with exit 2."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from lorasb_ds.modeling import tiny_tokenizer

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "from_dir"
    assert cli_main(["eval", *EVAL_ARGS, "--data", e2e["data"], "--adapter", e2e["adapter"], "--out", str(out),
                     "--model", str(model_dir), "--batch_size", "4"]) == 0
    assert read_jsonl(out / "generations.jsonl") == read_jsonl(e2e["out"] / "generations.jsonl")
    assert json.loads((out / "summary.json").read_text())["model"] == str(model_dir)

    small_dir = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(small_dir)
    tiny_tokenizer().save_pretrained(small_dir)
    err = run_cli_error(capsys, [*EVAL_ARGS, "--data", e2e["data"], "--adapter", e2e["adapter"],
                                 "--out", str(tmp_path / "o"), "--model", str(small_dir)])
    assert "does not fit this model" in err and "builtin:tiny-llama" in err
    assert not os.path.exists(tmp_path / "o")
    err = run_cli_error(capsys, [*EVAL_ARGS, "--data", e2e["data"], "--adapter", e2e["adapter"],
                                 "--out", str(tmp_path / "o"), "--model", str(tmp_path / "absent")])
    assert "--model: no such directory" in err


def test_errors_of_all_ranks_become_one_exception():
    same = [{"rank": 0, "config": True, "message": "bad"}, {"rank": 1, "config": True, "message": "bad"}]
    with pytest.raises(ConfigError, match=r"^ranks 0, 1: bad$"):
        ev._raise_errors(same, 2)
    with pytest.raises(ConfigError, match=r"^bad$"):
        ev._raise_errors(same[:1], 1)
    mixed = [same[0], {"rank": 1, "config": False, "message": "RuntimeError: out of memory"}]
    with pytest.raises(RuntimeError, match="rank 0: bad; rank 1: RuntimeError: out of memory"):
        ev._raise_errors(mixed, 2)
