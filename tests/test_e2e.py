"""End to end at 2 CPU processes, ZeRO-3, the built-in default: README's command through the real
``deepspeed`` runner, then runs that change one thing from it (an init file, estimation in passes,
ZeRO-2, the same model saved to disk and loaded partitioned) and a bf16 run through torchrun, which
starts the same ranks in less time (tests/test_launchers.py shows both launchers give the same adapter)."""

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, deepspeed_cmd, free_port, run_command, torchrun

pytestmark = pytest.mark.slow
SMALL = ["train.max_steps=4", "data.builtin_size=200", "lorasb.est_samples=12"]  # 2 estimation micro-batches a rank


def train(out, *extra, ds_config="ds_configs/zero3.json"):
    """A run of this file other than ``first_run``: through torchrun."""
    return torchrun(2, "launch/train.py", "--ds_config", ds_config, "--output_dir", str(out), *SMALL, *extra)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def shm_buffers(port: int) -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of the run whose master port is ``port`` (its name
    holds the port: runs of other tests alongside have buffers of their own)."""
    return {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in f}


LEFT_IN_SHM: dict[str, set[str]] = {}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    port = free_port()
    before = shm_buffers(port)
    proc = run_command(deepspeed_cmd("launch/train.py", "--ds_config", "ds_configs/zero3.json", "--output_dir",
                                     str(out), *SMALL, port=port))
    LEFT_IN_SHM["first_run"] = shm_buffers(port) - before
    return out, proc


def test_a_run_leaves_no_shared_memory_behind(first_run):
    """The deepspeed runner starts both ranks on this host, so DeepSpeed maps a 66 MB buffer per rank in
    /dev/shm; a run that left them there would hold that memory until the machine restarts."""
    assert LEFT_IN_SHM["first_run"] == set()


def test_default_run_estimates_trains_and_writes_the_adapter(first_run):
    out, proc = first_run
    records = metrics(out)
    assert records[0]["event"] == "init" and records[0]["estimated"] is True
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["loss"] < steps[0]["loss"]
    summary = json.load(open(os.path.join(out, "run_summary.json")))
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["estimated"] is True and summary["estimation_seconds"] > 0 and summary["resumed_from"] is None
    assert summary["trainable_parameters"] == 28 * 16 * 16
    with safe_open(os.path.join(out, "adapter", "lorasb_adapter.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lorasb"])
        assert len(list(f.keys())) == 28 and all(k.endswith(".lora_R") for k in f.keys())
    with safe_open(os.path.join(out, "adapter", "lorasb_init.safetensors"), "pt") as f:
        init_meta = json.loads(f.metadata()["lorasb"])
    assert init_meta["init_id"] == meta["init_id"] and init_meta["svd"] == "converged"
    assert len(init_meta["svd_iterations"]) == 28 and records[0]["max_svd_iterations"] >= 0
    assert "estimation:" in proc.stdout and "SVD (converged): captured energy" in proc.stdout
    assert "the global batch follows the number of ranks" in proc.stdout  # zero3.json sets no train_batch_size


def test_tensorboard_has_training_and_estimation_scalars(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = first_run
    acc = EventAccumulator(os.path.join(out, "tensorboard", "lorasb")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Train/loss", "Train/lr", "Train/grad_norm", "Train/param_norm"} <= tags
    assert sum(t.startswith("Estimation/energy/") for t in tags) == 28
    assert sum(t.startswith("Estimation/svd_iterations/") for t in tags) == 28
    assert len(acc.Scalars("Train/loss")) == 4


def test_init_file_run_skips_estimation_and_gives_the_same_first_loss(first_run, tmp_path):
    out, _ = first_run
    proc = train(tmp_path, "--init_file", os.path.join(out, "lorasb_init.safetensors"))
    assert "estimation:" not in proc.stdout
    again = metrics(tmp_path)
    assert again[0]["event"] == "init" and again[0]["estimated"] is False
    first = [r["loss"] for r in metrics(out) if "step" in r]
    second = [r["loss"] for r in again if "step" in r]
    assert abs(first[0] - second[0]) <= 1e-6 * abs(first[0])


def test_estimation_in_passes_under_an_accumulator_budget_gives_the_same_init(first_run, tmp_path):
    """lorasb.est_max_accum_gb = 400 kB per rank (of about 1.6 MB; the largest G is 197 kB): several
    passes over the estimation batches, and B, A, R come out bitwise the same as in one pass."""
    out, _ = first_run
    proc = train(tmp_path, "lorasb.est_max_accum_gb=0.0004", "train.max_steps=1")
    passes = int(proc.stdout.split(" passes) in ")[0].rsplit("(", 1)[1])
    assert passes >= 3
    one, grouped = (load_file(os.path.join(d, "lorasb_init.safetensors")) for d in (out, tmp_path))
    assert one.keys() == grouped.keys() and all(torch.equal(one[k], grouped[k]) for k in one)


def test_zero2_from_the_same_init_file_gives_the_same_first_loss(first_run, tmp_path):
    out, _ = first_run
    train(tmp_path, "--init_file", os.path.join(out, "lorasb_init.safetensors"), ds_config="ds_configs/zero2.json")
    first = [r["loss"] for r in metrics(out) if "step" in r]
    zero2 = [r["loss"] for r in metrics(tmp_path) if "step" in r]
    assert abs(first[0] - zero2[0]) <= 1e-5 * abs(first[0])
    assert zero2[-1] < zero2[0]


def test_bf16_with_activation_checkpointing_trains_R(tmp_path):
    """bf16 weights, non-reentrant checkpointing and a frozen base: R must still receive gradients."""
    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    ds["bf16"] = {"enabled": True}
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = tmp_path / "bf16.json"
    ds_path.write_text(json.dumps(ds))
    out = tmp_path / "run"
    train(out, "train.max_steps=3", "lorasb.est_samples=6", "model.gradient_checkpointing=true", ds_config=str(ds_path))
    losses = [r["loss"] for r in metrics(out) if "step" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trained = load_file(os.path.join(out, "adapter", "lorasb_adapter.safetensors"))
    init = load_file(os.path.join(out, "lorasb_init.safetensors"))
    moved = [float((R - init[k]).norm()) for k, R in trained.items()]
    assert len(moved) == 28 and all(m > 0 for m in moved)


def test_the_builtin_model_saved_and_loaded_partitioned_trains_the_same(first_run, tmp_path):
    """The same weights from a sharded safetensors checkpoint, each rank reading only its slices."""
    from lorasb_ds.modeling import tiny_llama, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir, max_shard_size="500KB")
    tiny_tokenizer().save_pretrained(model_dir)
    proc = train(tmp_path / "run", f"model.name_or_path={model_dir}")
    assert "[lorasb] warning" not in proc.stdout  # not the from_pretrained fallback
    builtin = [r["loss"] for r in metrics(first_run[0]) if "step" in r]
    loaded = [r["loss"] for r in metrics(tmp_path / "run") if "step" in r]
    assert loaded == pytest.approx(builtin, rel=1e-6)


def test_init_scale_bench_rescales_the_runs_R0(first_run):
    """bench/init_scale.py on the run's init file: the row of the run's own lr_eff holds its R0 (sum of
    ||R0||_F over modules, as ||B R0 A||_F with orthonormal B, A), lr_eff 0 is the base model, and the
    norm is proportional to lr_eff."""
    from safetensors.torch import load_file

    from lorasb_ds.files import read_init_metadata

    out, _ = first_run
    init = os.path.join(out, "lorasb_init.safetensors")
    lr_eff = float(read_init_metadata(init)["lr_eff"])
    proc = run_command([sys.executable, "bench/init_scale.py", "--init", init, "--rows", "8",
                        "--lr_eff", f"0,{lr_eff!r},{2 * lr_eff!r}"], timeout=300)
    rows = [line.split("|")[1:4] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip() for r in rows[1:]] == ["0 (base model)", f"{lr_eff:g} (this run)", f"{2 * lr_eff:g}"]
    norms = [float(r[2]) for r in rows[1:]]
    expected = sum(float(t.norm()) for k, t in load_file(init).items() if k.endswith(".lora_R"))
    assert norms[0] == 0.0 and abs(norms[1] - expected) < 1e-3 and abs(norms[2] - 2 * expected) < 2e-3
    assert all(float(r[1]) > 0 for r in rows[1:])
