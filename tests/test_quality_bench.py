"""The quality study (bench/quality.py --quick, bench/plot.py) end to end on the real SmolLM2, and the
shipped pretrained built-in model (lorasb_ds/assets/tiny-llama)."""

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import REPO, run_command

from lorasb_ds.modeling import TINY_LLAMA_DIR as MODEL


@pytest.mark.slow
def test_quick_study_trains_evaluates_caches_tabulates_and_plots(smollm_dir, tmp_path):
    """Two methods through the real launcher and `lorasb eval`, the base-model row, the table, the claims,
    the JSON and the figure; a rerun reads every run from the cache."""
    results, work = tmp_path / "results", tmp_path / "work"
    # 2 optimizer steps a run (the quick study's 4 less): a training launch is most of this test's time.
    # One process a launch: the study's logic is the same at any count, two ranks of SmolLM2 train in
    # test_real_models.py and generate in test_real_eval.py, and two here cost 1.8x the CPU time.
    cmd = [sys.executable, "bench/quality.py", "--quick", "--steps", "2", "--nproc", "1", "--model", str(smollm_dir),
           "--workdir", str(work), "--results", str(results)]
    out = run_command(cmd, timeout=900).stdout
    # 210 targets: r = 96 for LoRA-SB (96^2 each); LoRA r = 32 trains 32 (in + out) per target
    assert "| LoRA-SB | 96 | 1,935,360 | 0.198× | 22.1 MiB | 0.003 | 1 |" in out
    assert "| LoRA | 32 | 9,768,960 | 1× | 111.8 MiB | 0.001 | 1 |" in out
    assert "| base model, zero-shot | – | 0 |" in out
    assert "(ii) LoRA-SB within 1 point of LoRA r = 32" in out and "5.0× fewer" in out
    data = json.loads((results / "quality.json").read_text())
    assert set(data["rows"]) == {"base", "lorasb", "lora"}
    for method in ("lorasb", "lora"):
        row = data["rows"][method]
        assert [s for s, _ in row["curves"][0]] == [1, 2] and len(row["strict"]) == 1
        assert 0.0 <= row["strict"][0] <= 1.0 and 0.0 <= row["flexible"][0] <= 1.0
    assert len(data["energy"]) == 210 and all(0.0 < e <= 1.0 + 1e-4 for e in data["energy"].values())
    run = json.loads((results / "runs" / "lorasb_lr0.003_seed1.json").read_text())
    assert run["validation"]["rows"] == 4 and run["test"]["rows"] == 8
    # the second test split: the same runs scored on new problems of the training stories, in its own table
    assert run["test_seen"]["rows"] == 8 and len(run["test_seen"]["data"]) == 16
    assert all(len(data["rows"][m]["seen_strict"]) == 1 for m in ("base", "lorasb", "lora"))
    assert "held-out problems of the training stories" in out and "on test_seen: " in out
    assert f"| LoRA-SB | 1 | {100 * run['test_seen']['strict']:.1f} |" in out
    gens = [json.loads(line) for line in open(work / "eval" / "lorasb_lr0.003_seed1_test" / "generations.jsonl")]
    assert all(g["prompt"].startswith("<|im_start|>system") and g["prompt"].endswith("<|im_start|>assistant\n")
               for g in gens)  # the chat template, as in training
    png = results / "quality.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    again = run_command(cmd, timeout=300).stdout  # every run cached: nothing trains or evaluates again
    assert again.count(": cached") == 2 and "  eval " not in again
    assert json.loads((results / "quality.json").read_text())["table"] == data["table"]

    # a cached run still to be scored whose outputs are gone (another machine) is trained again, to the
    # same loss curve, and scored
    record = results / "runs" / "lora_lr0.001_seed1.json"
    cached = json.loads(record.read_text())
    del cached["test"]
    record.write_text(json.dumps(cached))
    shutil.rmtree(work / "runs" / "lora_lr0.001_seed1")
    third = run_command(cmd, timeout=600).stdout
    assert "lora_lr0.001_seed1: its adapter is gone; training it again to score it on test" in third
    assert "eval lora_lr0.001_seed1 on test" in third and "eval lorasb" not in third
    rescored = json.loads(record.read_text())
    assert rescored["curve"] == cached["curve"] and rescored["test"]["rows"] == 8

    # --report_only: what is cached, and a row not done yet named, with nothing trained or scored
    logs = set(os.listdir(work / "logs"))
    partial = run_command(cmd + ["--report_only", "--methods", "lorasb,lora,loraxs"], timeout=300).stdout
    assert "Not finished yet, so left out: LoRA-XS" in partial and "| LoRA-XS | 0.001 | n/a | n/a | pending |" in partial
    assert "| LoRA-SB | 96 | 1,935,360 |" in partial and set(os.listdir(work / "logs")) == logs


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


def test_claims_follow_the_numbers():
    """(i)-(iii) of the study's report, said from the rows they name, with the numbers; a variant row
    is reported apart and never decides whether LoRA-SB leads."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from quality import claims

    rows = {"lorasb": {"strict": [0.50, 0.52], "trainable": 1_935_360},
            "lora": {"strict": [0.53, 0.50], "trainable": 9_768_960},
            "loraxs": {"strict": [0.40, 0.42], "trainable": 1_935_360},
            "lorasb_lr_eff": {"strict": [0.6]}}
    i, ii, iii, variant = claims(rows, {"lorasb": 0.5, "lora": 0.6, "loraxs": 0.7, "lorasb_lr_eff": 0.3})
    assert i.startswith("(i) LoRA-SB ≥ LoRA-XS at the same trained count, on test: yes (strict 51.0% ± 1.4 "
                        "against 41.0%")
    assert ii.startswith("(ii) LoRA-SB within 1 point of LoRA r = 32 or above it, with ≥ 5× fewer trained numbers, "
                         "on test: yes (strict 51.0% against 51.5%, 5.0× fewer)")
    assert claims(rows, {}, "test_seen")[0].startswith("(i) LoRA-SB ≥ LoRA-XS at the same trained count, on "
                                                       "test_seen: yes")
    assert iii.startswith("(iii) LoRA-SB's loss leads early (mean loss of steps 1-10): yes")
    assert variant == "(LoRA-SB, lr_eff 1e-4: strict 60.0% ± 0.0, early loss 0.300.)"
    rows["lora"]["strict"] = [0.60, 0.60]  # 9 points above: (ii) fails
    assert "yes" not in claims(rows, {})[1] and claims(rows, {})[2].endswith("not measured yet.")
    del rows["loraxs"]
    assert claims(rows, {})[0] == "(i) LoRA-SB vs LoRA-XS at the same trained count: not measured yet."


def test_the_report_replaces_only_what_stands_between_its_markers(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from quality import write_block

    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- quality-report -->\nold table\n<!-- /quality-report -->\nafter\n")
    write_block(str(doc), "| new | table |")
    write_block(str(doc), "| newer | table |")
    assert doc.read_text() == "intro\n<!-- quality-report -->\n| newer | table |\n<!-- /quality-report -->\nafter\n"
    (tmp_path / "other.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- quality-report --> marker"):
        write_block(str(tmp_path / "other.md"), "x")


def test_cached_runs_outlive_a_new_transformers_release(tmp_path):
    """The cache key of the model is its config without the version of transformers that wrote it: the
    same model written again by another release keeps the study's cached runs; another model does not."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from quality import config_digest

    config = {"model_type": "llama", "hidden_size": 576, "transformers_version": "5.25.0"}
    paths = []
    for i, change in enumerate([{}, {"transformers_version": "5.30.1"}, {"hidden_size": 960}]):
        paths.append(tmp_path / f"config{i}.json")
        paths[-1].write_text(json.dumps(config | change))
    digests = [config_digest(str(p)) for p in paths]
    assert digests[0] == digests[1] != digests[2]
