"""GLUE: metrics checked by hand, sentence(-pair) encoding and labels, and the settings that go with it."""

import json
import os

import datasets
import pytest
import torch

from lorasb_ds import glue
from lorasb_ds.config import ConfigError, DataConfig, load_run_config
from lorasb_ds.data import collate, load_rows, tokenize_rows
from lorasb_ds.modeling import tiny_roberta, tiny_tokenizer
from lorasb_ds.surgery import modules_to_save

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "samples")


# --------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    pred, gold = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]  # tp 2, tn 2, fp 1, fn 1
    assert glue.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert glue.f1(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert glue.matthews(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / 3 ** 2)  # every factor is 3
    assert glue.matthews([0] * 6, gold) == 0.0  # a constant prediction: a zero factor
    assert glue.matthews(gold, gold) == pytest.approx(1.0) and glue.f1(gold, gold) == 1.0
    assert glue.matthews([1 - g for g in gold], gold) == pytest.approx(-1.0)
    assert glue.f1([0, 0], [0, 0]) == 0.0  # no positive anywhere


def test_correlations_by_hand():
    assert glue.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert glue.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert glue.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 5)
    assert glue.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert glue.ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert glue.spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)
    assert glue.pearson([1, 2, 3], [1, 4, 9]) < 0.99  # monotonic, not linear
    assert glue.spearman([0.5, 3.0, 3.0, 1.0], [1, 4, 3, 2]) == pytest.approx(
        glue.pearson([1, 3.5, 3.5, 2], [1, 4, 3, 2]))


def test_each_task_reports_its_metrics():
    assert set(glue.compute_metrics(glue.TASKS["cola"], [1, 0], [1, 1])) == {"matthews", "accuracy"}
    assert set(glue.compute_metrics(glue.TASKS["mrpc"], [1, 0], [1, 1])) == {"accuracy", "f1"}
    assert set(glue.compute_metrics(glue.TASKS["stsb"], [0.5, 2.0], [1.0, 4.0])) == {"pearson", "spearman"}
    assert glue.TASKS["mnli"].num_labels == 3 and glue.TASKS["stsb"].num_labels == 1


# --------------------------------------------------------------------------- data


def glue_cfg(task, **kw):
    return DataConfig(path=os.path.join(SAMPLES, f"glue_{task}.jsonl"), format="glue", glue_task=task, **kw)


def test_single_sentences_encode_with_integer_labels():
    tok = tiny_tokenizer()
    cfg = glue_cfg("sst2")
    rows = load_rows(cfg, seed=0)
    examples, truncated = tokenize_rows(rows, tok, cfg)
    assert truncated == 0 and len(examples) == len(rows) == 40
    for row, ex in zip(rows, examples):
        assert ex["input_ids"] == tok(row["sentence"])["input_ids"] and ex["labels"] == row["label"]
    batch = collate(examples[:3], tok.pad_token_id)
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (3,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape


def test_pairs_encode_together_and_regression_labels_are_floats():
    tok = tiny_tokenizer()
    cfg = glue_cfg("stsb")
    rows = load_rows(cfg, seed=0)
    examples, _ = tokenize_rows(rows, tok, cfg)
    first = examples[0]
    assert first["input_ids"] == tok(rows[0]["sentence1"], rows[0]["sentence2"])["input_ids"]
    assert tok.eos_token_id in first["input_ids"][1:-1]  # <s> a </s> b
    assert batch_labels(examples, tok).dtype == torch.float32
    assert isinstance(first["labels"], float) and first["labels"] == rows[0]["label"]


def batch_labels(examples, tok):
    return collate(examples[:4], tok.pad_token_id)["labels"]


def test_long_pairs_are_cut_and_counted():
    tok = tiny_tokenizer()
    cfg = glue_cfg("mrpc", max_length=40)
    rows = load_rows(cfg, seed=0)
    examples, truncated = tokenize_rows(rows, tok, cfg)
    full = [len(tok(a, b)["input_ids"]) for a, b in zip(rows["sentence1"], rows["sentence2"])]
    assert truncated == sum(n > 40 for n in full) > 0
    assert max(len(ex["input_ids"]) for ex in examples) == 40


def test_unlabelled_rows_and_missing_columns_are_clear_errors(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"sentence": "a film", "label": -1}) + "\n")
    cfg = DataConfig(path=str(path), format="glue", glue_task="sst2")
    with pytest.raises(ConfigError, match=r"row 0 .*label -1 .*train split"):
        tokenize_rows(load_rows(cfg, seed=0), tok, cfg)
    cfg = DataConfig(path=os.path.join(SAMPLES, "glue_sst2.jsonl"), format="glue", glue_task="mrpc")
    with pytest.raises(ConfigError, match="no column 'sentence1'"):
        load_rows(cfg, seed=0)


@pytest.mark.parametrize("overrides, needle", [
    (["data.format=glue", "data.glue_task=sst2", f"data.path={SAMPLES}/glue_sst2.jsonl"], "model.task"),
    (["model.task=seq_cls", f"data.path={SAMPLES}/alpaca.jsonl", "data.format=alpaca"], "model.task"),
    (["model.task=seq_cls", "data.format=glue", f"data.path={SAMPLES}/glue_sst2.jsonl"], "data.glue_task"),
    (["model.task=seq_cls", "data.format=glue", "data.glue_task=sst3",
      f"data.path={SAMPLES}/glue_sst2.jsonl"], "data.glue_task must be one of"),
    (["data.glue_task=sst2"], "data.glue_task applies to data.format=glue only"),
    (["model.task=tagging"], "model.task must be"),
])
def test_settings_that_do_not_go_together(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, overrides)


def test_the_head_is_found_or_named():
    model = tiny_roberta(2)
    assert modules_to_save(model, None, "seq_cls") == ["classifier"]
    assert modules_to_save(model, None, "causal_lm") == []
    assert modules_to_save(model, ["out_proj"], "seq_cls") == ["classifier.out_proj"]
    with pytest.raises(ConfigError, match="lorasb.modules_to_save: 'head' matches no module"):
        modules_to_save(model, ["head"], "seq_cls")
    encoder = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="no module named classifier or score"):
        modules_to_save(encoder, None, "seq_cls")


def test_hub_glue_defaults_the_subset_to_the_task(monkeypatch):
    seen = {}

    def fake_load_dataset(path, subset=None, split=None, **kw):
        seen.update(path=path, subset=subset, split=split)
        return datasets.Dataset.from_list([{"sentence": "good", "label": 1, "idx": 0}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows(DataConfig(path="nyu-mll/glue", format="glue", glue_task="sst2"), seed=0)
    assert seen == {"path": "nyu-mll/glue", "subset": "sst2", "split": "train"} and len(rows) == 1


def test_shipped_glue_config_passes_every_check(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(SAMPLES.rstrip("/").rsplit("/", 1)[0])
    proc = subprocess.run([sys.executable, "-m", "lorasb_ds.cli", "train", "--config", "configs/tiny-glue.yaml",
                           "--ds_config", "ds_configs/zero3.json", "--dry_run", "--output_dir", str(tmp_path)],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"dry_run": true' in proc.stdout and "roberta" in proc.stdout
