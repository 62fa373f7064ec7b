"""`lorasb eval` on the real SmolLM2-135M-Instruct through its chat template: the prompt of a row is the
training prompt of that row under the real tokenizer, and two ranks generate what one does."""

import json
import os
import sys

import pytest

from conftest import REPO, torchrun
from lorasb_ds.cli import main as cli_main

pytestmark = pytest.mark.slow

ROWS = 4
EVAL = ["--task", "gsm8k", "--prompt_template", "chat", "--max_new_tokens", "24", "--batch_size", "1"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("real_eval") / "test.jsonl"
    rows = read_jsonl(os.path.join(REPO, "data", "word_problems", "test.jsonl"))[:ROWS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def one_rank(smollm_dir, problems, tmp_path_factory):
    """``lorasb eval`` of the problems in this process (one rank): its output folder."""
    out = tmp_path_factory.mktemp("one_rank")
    assert cli_main(["eval", *EVAL, "--data", problems, "--model", smollm_dir, "--out", str(out)]) == 0
    return out


def test_eval_prompt_is_the_training_prompt_under_the_real_chat_template(smollm_dir, problems, one_rank):
    from transformers import AutoTokenizer

    from lorasb_ds.config import DataConfig
    from lorasb_ds.data import load_rows, tokenize_rows

    gens = read_jsonl(one_rank / "generations.jsonl")
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    cfg = DataConfig(path=problems, query_field="question", response_field="answer", prompt_template="chat")
    training, _ = tokenize_rows(load_rows(cfg, 0), tok, cfg)
    for g, row in zip(gens, training):
        n_prompt = sum(1 for label in row["labels"] if label == -100)
        assert tok(g["prompt"], add_special_tokens=False)["input_ids"] == row["input_ids"][:n_prompt]
        assert g["prompt"].startswith("<|im_start|>system\n") and g["prompt"].endswith("<|im_start|>assistant\n")
        assert g["generation"].strip()  # the instruct model answers something
    summary = json.loads((one_rank / "summary.json").read_text())
    assert summary["rows"] == ROWS and summary["adapter"] is None


def test_two_ranks_generate_what_one_does(smollm_dir, problems, one_rank, tmp_path):
    one, two = one_rank, tmp_path / "two"
    torchrun(2, "launch/evaluate.py", *EVAL, "--data", problems, "--model", smollm_dir, "--out", str(two),
             timeout=600)
    a, b = read_jsonl(one / "generations.jsonl"), read_jsonl(two / "generations.jsonl")
    assert [(r["index"], r["prompt"], r["generation"]) for r in a] == [(r["index"], r["prompt"], r["generation"])
                                                                       for r in b]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("config", ["configs/smollm2-135m-math.yaml", "configs/smollm2-135m-chat.yaml"])
def test_shipped_smollm2_configs_pass_every_check(smollm_dir, config, tmp_path):
    """The run configs of the real model: data, chat template, targets and rank checked on its config, and
    nothing written (--dry_run)."""
    import subprocess

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lorasb_ds.cli", "train", "--config", config, "--ds_config",
                           "ds_configs/zero3.json", "--dry_run", "--output_dir", str(out),
                           f"model.name_or_path={smollm_dir}"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = 96 if "math" in config else 64
    assert f"LoRA-SB plan: llama, 30 layers, hidden 576, r={r}, 210 targets" in proc.stdout
    assert "no sample is longer than data.max_length=256 tokens" in proc.stdout
    assert "GB per rank (host memory / 1 rank(s) on this host): fits" in proc.stdout
    assert not out.exists() or not os.listdir(out)  # nothing written
    if "chat" in config:
        return
    # on a device where the estimation's accumulators are what is over: the fewest passes that fit, named
    summary = dry_run_summary(proc.stdout)
    assert summary["fits"] and summary["est_passes"] == 1
    assert summary["estimation_peak_gb"] - summary["accumulators_gb"] + 0.1 < summary["training_peak_gb"]
    device_gb = (summary["estimation_peak_gb"] - summary["accumulators_gb"] / 2) / 0.9  # 10% headroom
    proc = subprocess.run(proc.args + ["--device_memory_gb", f"{device_gb:.3f}"], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grouped = dry_run_summary(proc.stdout)
    assert grouped["fits"] and grouped["est_passes"] > 1
    assert grouped["estimation_peak_gb"] < summary["estimation_peak_gb"]
    assert f"GB per rank (--device_memory_gb): fits" in proc.stdout
    assert f"the estimation in {grouped['est_passes']} passes: set lorasb.est_max_accum_gb=" in proc.stdout


def dry_run_summary(stdout: str) -> dict:
    """The JSON summary a --dry_run prints before its plan."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index('{\n  "dry_run"'):])[0]
