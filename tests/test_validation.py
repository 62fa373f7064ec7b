"""Validation during training and early stopping, on the built-in model in one process (ZeRO-3 engine):
the held-out loss is logged at its steps on the optimizer-step axis (metrics.jsonl, TensorBoard and
DeepSpeed's CSV monitor), and the run stops where the patience rule says, with a checkpoint and an
adapter written there."""

import csv
import json
import os
import sys

import pytest
import torch

from conftest import REPO, run_command

PATIENCE, EVERY, MAX_STEPS = 1, 2, 20


def expected_stop(evals: list[dict]) -> int | None:
    """The step at which the rule stops: the first validation that is the PATIENCE-th in a row without
    a new best loss (recomputed here from the logged losses alone)."""
    best, since = None, 0
    for e in evals:
        if best is None or e["eval_loss"] < best:
            best, since = e["eval_loss"], 0
        else:
            since += 1
        if since >= PATIENCE:
            return e["step"]
    return None


def train(out, *overrides, ds_config="ds_configs/zero3.json"):
    run_command([sys.executable, "-m", "lorasb_ds.cli", "train", "--ds_config", ds_config, "--output_dir", str(out),
                 "data.builtin_size=200", "lorasb.est_samples=8", "data.eval_fraction=0.1", f"train.eval_every={EVERY}",
                 "train.lr=0.05", "train.schedule=constant", *overrides], timeout=600)


def test_early_stopping_stops_where_its_rule_says(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ds_config = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    ds_config["csv_monitor"] = {"enabled": True, "job_name": "lorasb"}  # output_path: the run's csv/ folder
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    train(out, f"train.early_stopping_patience={PATIENCE}", f"train.max_steps={MAX_STEPS}",
          ds_config=str(tmp_path / "ds.json"))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if r.get("event") == "eval"]
    summary = json.load(open(out / "run_summary.json"))
    stop = expected_stop(evals)
    assert stop is not None and stop < MAX_STEPS, "this run was meant to stop early"
    assert [e["step"] for e in evals] == list(range(EVERY, stop + 1, EVERY))
    assert summary["steps"] == stop and summary["stopped_early"] is True
    assert summary["best_eval_loss"] == min(e["eval_loss"] for e in evals)
    assert (out / "checkpoints" / f"step{stop:08d}").is_dir() and (out / "adapter").is_dir()
    # one x axis: TensorBoard's points sit at the optimizer steps metrics.jsonl names
    acc = EventAccumulator(str(out / "tensorboard" / "lorasb")).Reload()
    assert [e.step for e in acc.Scalars("Train/loss")] == [r["step"] for r in records if "loss" in r]
    assert [(e.step, e.value) for e in acc.Scalars("Eval/loss")] == \
        [(e["step"], pytest.approx(e["eval_loss"], rel=1e-6)) for e in evals]
    # DeepSpeed's CSV monitor gets the same scalars at the same steps
    with open(out / "csv" / "lorasb" / "Eval_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    assert [(int(step), float(value)) for step, value in rows[1:]] == \
        [(e["step"], pytest.approx(e["eval_loss"], rel=1e-6)) for e in evals]
    with open(out / "csv" / "lorasb" / "Train_loss.csv") as f:
        assert [int(row[0]) for row in list(csv.reader(f))[1:]] == [r["step"] for r in records if "loss" in r]


def test_keep_best_writes_the_adapter_of_the_best_step(tmp_path):
    """With train.keep_best the run above writes the adapter of its best validation step, kept whatever
    keep_last says: bitwise the adapter of the same run stopped at that step."""
    from safetensors.torch import load_file

    best_run, short_run = tmp_path / "best", tmp_path / "short"
    train(best_run, f"train.early_stopping_patience={PATIENCE}", f"train.max_steps={MAX_STEPS}",
          "train.keep_best=true", "train.keep_last=1")
    summary = json.load(open(best_run / "run_summary.json"))
    evals = [r for r in map(json.loads, open(best_run / "metrics.jsonl")) if r.get("event") == "eval"]
    best_step = min(evals, key=lambda e: e["eval_loss"])["step"]
    assert summary["stopped_early"] and best_step < summary["steps"] and summary["adapter_step"] == best_step
    kept = sorted(p.name for p in (best_run / "checkpoints").iterdir())
    assert kept == [f"step{best_step:08d}", f"step{summary['steps']:08d}"]  # keep_last=1, and the best
    train(short_run, f"train.max_steps={best_step}")  # the same data, schedule and steps, stopped there
    a = load_file(best_run / "adapter" / "lorasb_adapter.safetensors")
    b = load_file(short_run / "adapter" / "lorasb_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
