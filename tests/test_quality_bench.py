"""The quality study (bench/quality.py, bench/plot.py) end to end at toy size, and the shipped
pretrained built-in model (lorasb_ds/assets/tiny-llama)."""

import json
import os
import sys

import pytest
import torch

from conftest import REPO, run_command

from lorasb_ds.modeling import TINY_LLAMA_DIR as MODEL


@pytest.mark.slow
def test_quality_study_trains_evaluates_tabulates_and_plots(tmp_path):
    """Pretraining for a few steps, two methods through the real launcher and `lorasb eval`, the table,
    the JSON and the figure."""
    work, result = tmp_path / "quality", tmp_path / "quality.json"
    proc = run_command([sys.executable, "bench/quality.py", "--pretrain_steps", "3", "--methods", "lorasb,lora",
                        "--lr", "lorasb=5e-3", "--lr", "lora=5e-3", "--seeds", "7", "--steps", "2",
                        "--train_rows", "48", "--est_samples", "6", "--eval_rows", "4", "--max_new_tokens", "4",
                        "--nproc", "1", "--workdir", str(work), "--json", str(result)], timeout=300)
    out = proc.stdout
    # 4 layers x 7 targets; r = 32 for LoRA-SB (r^2 each), r = 8 for LoRA (8 (in + out) each)
    assert "| lorasb | 32 | 28,672 | 0.368x | 0.005 | 1 |" in out
    assert "| lora | 8 | 77,824 | 1x | 0.005 | 1 |" in out
    assert "Machine: " in out and "Command: python bench/quality.py --pretrain_steps 3" in out

    data = json.loads(result.read_text())
    assert [r["method"] for r in data["results"]] == ["lorasb", "lora"]
    assert data["test_set"]["rows"] == 4 and data["pretrain"]["steps"] == 3
    runs = {r["method"]: r for r in data["runs"]}
    for run in runs.values():
        assert run["status"] == "ok" and [s for s, _ in run["curve"]] == [1, 2]
        assert 0.0 <= run["accuracy_strict"] <= 1.0 and 0.0 <= run["accuracy_flexible"] <= 1.0
        assert run["eval_rows"] == 4
    assert len(runs["lorasb"]["energy"]) == 28
    energies = runs["lorasb"]["energy"].values()
    assert all(0.0 <= e <= 1.0 + 1e-3 for e in energies), sorted(energies)
    rows = [json.loads(line) for line in open(work / "gsm8k_test.jsonl")]
    assert len(rows) == 4 and all("\n#### " in r["answer"] for r in rows)

    png = tmp_path / "quality.png"
    run_command([sys.executable, "bench/plot.py", "--json", str(result), "--out", str(png)], timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_test_set_leaves_out_training_questions():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from quality import test_rows

    from lorasb_ds.data import synthetic_math_rows

    train = {r["query"] for r in synthetic_math_rows(300, 5)}
    # the training seed itself: its first 300 questions are all training questions, so all are left out
    rows, dropped = test_rows(50, 5, 300, [5])
    assert len(rows) == 50 and dropped >= 300 and not any(r["question"] in train for r in rows)
    assert len({r["question"] for r in rows}) == 50
    rows, _ = test_rows(50, 11, 300, [5])
    assert len(rows) == 50 and not any(r["question"] in train for r in rows)
    assert all(r["answer"].rsplit("\n#### ", 1)[1].isdigit() for r in rows)


def test_shipped_model_loads_and_its_tokenizer_round_trips():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasb_ds.modeling import tiny_tokenizer

    size = sum(os.path.getsize(os.path.join(MODEL, f)) for f in os.listdir(MODEL))
    assert size <= 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    assert model.config.model_type == "llama" and model.config.vocab_size == 128
    text = "Tom has 12 apples.\n37 + 48 = 85, $7.50 (20%)!"
    ids = tokenizer(text)["input_ids"]
    assert ids == tiny_tokenizer()(text)["input_ids"] and ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character after <s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)

    # it learned something: equations it was never shown are far likelier than under a uniform guess
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from pretrain import corpus_lines

    lines = [line for line in corpus_lines(200, seed=999) if " = " in line][:32]
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert loss < 1.5, loss  # uniform over the vocabulary: ln 128 = 4.85
