"""Checkpoints and exact resume: SIGKILL mid-run, a half-written checkpoint, SIGTERM preemption."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, torchrun, torchrun_cmd
from lorasb_ds.checkpoint import complete_checkpoints
from lorasb_ds.files import MARKER
from lorasb_ds.checkpoint import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
STEPS = 8
ARGS = ["--ds_config", "ds_configs/zero3.json", "data.builtin_size=200", f"train.max_steps={STEPS}",
        "train.save_every=2", "train.keep_last=3", "lorasb.est_samples=6"]


def step_losses(out):
    """{step: loss} of the last segment of metrics.jsonl (after the last init event)."""
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last_init = max(i for i, r in enumerate(records) if r.get("event") == "init")
    return records[last_init], {r["step"]: r["loss"] for r in records[last_init + 1:]}


def env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, frontier = [pid], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        tree += children
        frontier = children
    return tree


def wait_for(path, proc, timeout=300):
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    torchrun(2, "launch/train.py", *ARGS, "--output_dir", str(out))
    return out


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    cmd = torchrun_cmd("launch/train.py", *ARGS, "--output_dir", str(out))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(out / "checkpoints" / "step00000004" / MARKER, proc)
    tree = process_tree(proc.pid)
    assert len(tree) >= 3  # the launcher and its two ranks
    for pid in tree:  # all of them, mid-run
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not (out / "adapter").exists()  # it really did not finish

    # A checkpoint cut off while being written (no marker, files missing) must be ignored.
    latest = complete_checkpoints(str(out))[-1]
    truncated = out / "checkpoints" / "step00000007"
    shutil.copytree(latest, truncated)
    (truncated / MARKER).unlink()
    shutil.rmtree(truncated / "state")
    resumed_from = int(os.path.basename(latest)[4:])
    # A step logged after the checkpoint, before the kill (as the killed run may or may not have left one)
    from torch.utils.tensorboard import SummaryWriter

    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": resumed_from + 1, "loss": 99.0}) + "\n")
    with SummaryWriter(str(out / "tensorboard" / "lorasb"), filename_suffix=".before-kill") as w:
        w.add_scalar("Train/loss", 99.0, 10_000)

    proc = torchrun(2, "launch/train.py", *ARGS, "--output_dir", str(out), "--resume", "auto")
    assert "estimation:" not in proc.stdout  # B and A come from the run's init file
    assert f"[lorasb] --resume auto: continuing from {latest} (step {resumed_from})" in proc.stdout
    init_event, losses = step_losses(out)
    assert init_event["estimated"] is False and init_event["start_step"] == resumed_from
    assert init_event["resumed_from"] == latest
    _, full = step_losses(uninterrupted)
    assert sorted(losses) == list(range(resumed_from + 1, STEPS + 1))
    assert_one_history(out, latest, resumed_from)
    for step, loss in losses.items():
        assert loss == full[step], (step, loss, full[step])  # bitwise: same float repr
    a = load_file(os.path.join(uninterrupted, "adapter", "lorasb_adapter.safetensors"))
    b = load_file(os.path.join(out, "adapter", "lorasb_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_one_history(out, latest, resumed_from):
    """The run's log reads as one run: each step once in metrics.jsonl and in TensorBoard (points
    written after the checkpoint, before the kill, dropped), the summary knows it estimated and resumed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "step" in r] == list(range(1, STEPS + 1))
    assert [r["start_step"] for r in records if r.get("event") == "init"] == [0, resumed_from]
    acc = EventAccumulator(str(out / "tensorboard" / "lorasb")).Reload()
    assert len(list((out / "tensorboard" / "lorasb").iterdir())) >= 3  # the killed run's files, the resumed one's
    assert 99.0 not in [e.value for e in acc.Scalars("Train/loss")]
    assert [e.step for e in acc.Scalars("Train/loss")] == list(range(1, STEPS + 1))  # the optimizer-step axis
    summary = json.load(open(out / "run_summary.json"))
    assert summary["estimated"] is True and summary["estimation_seconds"] > 0
    assert summary["resumed_from"] == latest and summary["resumed_at_step"] == resumed_from


def test_keep_last_prunes_old_checkpoints(uninterrupted):
    names = [os.path.basename(p) for p in complete_checkpoints(str(uninterrupted))]
    assert names == ["step00000004", "step00000006", "step00000008"]


def test_sigterm_checkpoints_and_exits_with_the_preemption_code(tmp_path):
    out = tmp_path / "preempted"
    cmd = [sys.executable, "launch/train.py", *ARGS, "train.max_steps=40", "train.save_every=0",
           "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env(), MASTER_PORT=str(free_port())),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    start = time.time()
    while not (metrics.exists() and '"step": 2,' in metrics.read_text()):
        assert proc.poll() is None and time.time() - start < 300, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "stopped by a signal" in output
    (checkpoint,) = complete_checkpoints(str(out))
    stopped_at = json.load(open(os.path.join(checkpoint, MARKER)))["step"]
    assert 2 <= stopped_at < 40
    resumed = subprocess.run(cmd + ["--resume", "auto"], cwd=REPO, env=dict(env(), MASTER_PORT=str(free_port())),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _, losses = step_losses(out)
    assert sorted(losses) == list(range(stopped_at + 1, 41))


def test_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "diverged"
    cmd = [sys.executable, "launch/train.py", *ARGS, "train.lr=1e30", "lorasb.lr_eff=1e-3",
           "train.save_every=1", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env(), MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    message = re.search(r"lorasb: stopped: (.*)", proc.stderr).group(1)
    assert "NaN or inf at step" in message and "--resume auto" in message
    bad_step = int(message.split("at step ")[1].split(";")[0])
    kept = [int(os.path.basename(p)[4:]) for p in complete_checkpoints(str(out))]
    assert all(k < bad_step for k in kept)  # nothing written at or after the bad step
    assert not (out / "adapter").exists()
