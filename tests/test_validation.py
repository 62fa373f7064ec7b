"""Validation during training and early stopping, on the built-in model in one process (ZeRO-3 engine):
the held-out loss is logged at its steps on the optimizer-step axis (metrics.jsonl, TensorBoard and
DeepSpeed's CSV monitor), and the run stops where the patience rule says, with a checkpoint and an
adapter written there."""

import csv
import json
import os
import sys

import pytest

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


def test_early_stopping_stops_where_its_rule_says(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ds_config = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    ds_config["csv_monitor"] = {"enabled": True, "job_name": "lorasb"}  # output_path: the run's csv/ folder
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    run_command([sys.executable, "-m", "lorasb_ds.cli", "train", "--ds_config", str(tmp_path / "ds.json"),
                 "--output_dir", str(out), "data.builtin_size=200", "lorasb.est_samples=8",
                 "data.eval_fraction=0.1", f"train.eval_every={EVERY}", f"train.early_stopping_patience={PATIENCE}",
                 f"train.max_steps={MAX_STEPS}", "train.lr=0.05", "train.schedule=constant"], timeout=600)
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
