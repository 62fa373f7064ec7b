"""Every bad input is a clear error before the heavy work, and nothing the user had is touched.

Each case runs the real command line (``lorasb_ds.cli.main``, as ``lorasb train`` does) in this process
with ``train.build`` (process group, model loading, engine) replaced by a tripwire: the command must
exit 2 with a message naming the setting, and the tripwire must not fire.
"""

import json
import os
import tempfile
import time

import pytest
import torch
from safetensors.torch import save_file

import lorasb_ds.train as train_module
from conftest import REPO
from lorasb_ds import checkpoint
from lorasb_ds.cli import main
from lorasb_ds.config import load_run_config
from lorasb_ds.files import INIT_FORMAT, MARKER

ZERO3 = os.path.join(REPO, "ds_configs", "zero3.json")


@pytest.fixture(autouse=True)
def tripwire(monkeypatch, tmp_path):
    def heavy_work(*args, **kwargs):
        raise AssertionError("heavy work started (process group / model loading)")

    monkeypatch.setattr(train_module, "build", heavy_work)
    # A case that sets a launcher's variables prints its error once per launch (ranks.first_to_say): the
    # launch is this process's parent, the same for every run of the suite from one shell, so the marks
    # of what was said go to this case's own folder instead of the shared temporary one.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def fails(capsys, *args, ds_config=ZERO3, out=None):
    """Run ``lorasb train``; it must exit 2 and leave no new output folder; returns its error message."""
    argv = ["train", "--ds_config", ds_config, *args]
    if out is not None:
        argv += ["--output_dir", str(out)]
    existed = out is not None and os.path.exists(out)
    assert main(argv) == 2
    assert existed or out is None or not os.path.exists(out), f"a refused run created {out}"
    err = capsys.readouterr().err
    assert "lorasb: error: " in err  # (datasets may print a progress bar before it)
    return err.split("lorasb: error: ", 1)[1]


def test_malformed_run_config(tmp_path, capsys):
    err = fails(capsys, "--config", write(tmp_path / "run.yaml", "lorasb: [r: 8\n"), out=tmp_path / "o")
    assert "is not valid YAML" in err


@pytest.mark.parametrize("override, needle", [
    ("lorasb.rank=8", "unknown setting 'lorasb.rank'"),
    ("lorasb.r=0", "lorasb.r must be a positive integer"),
    ("lorasb.r=-3", "lorasb.r must be a positive integer"),
    ("lorasb.est_samples=0", "lorasb.est_samples must be at least 1"),
    ("train.lr=fast", "train.lr: expected a number"),
])
def test_bad_run_settings(tmp_path, capsys, override, needle):
    assert needle in fails(capsys, override, out=tmp_path / "o")


@pytest.mark.parametrize("content, needle", [
    ("{not json", "is not valid JSON"),
    ('{"train_micro_batch_size_per_gpu": "auto"}', "'train_micro_batch_size_per_gpu' is \"auto\""),
    ('{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}',
     "'zero_optimization.reduce_bucket_size' is \"auto\""),
    ('{"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": true}}', "fp16.enabled is true but the accelerator"),
    ('{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"}}', "remove the 'optimizer' block"),
])
def test_bad_deepspeed_config(tmp_path, capsys, content, needle):
    assert needle in fails(capsys, ds_config=write(tmp_path / "ds.json", content), out=tmp_path / "o")


def test_batch_triple_that_does_not_match_the_world_size(tmp_path, capsys, monkeypatch):
    launch = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for name, value in launch.items():  # as torchrun sets them
        monkeypatch.setenv(name, value)
    ds = write(tmp_path / "ds.json", json.dumps(
        {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}))
    err = fails(capsys, ds_config=ds, out=tmp_path / "o")
    assert "train_batch_size 16 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1" in err
    assert "world size 2" in err


@pytest.mark.parametrize("override, needle", [
    ("lorasb.r=100", "lorasb.r = 100 exceeds min(out, in) = 64"),
    # the hint names the binding (narrowest) target, not the first one: q_proj is 128 wide, k_proj 64
    ("lorasb.r=1000", "of 'model.layers.0.self_attn.k_proj' (64 x 128), the narrowest target; lower lorasb.r "
                      "to at most 64, or drop the targets narrower than 1000 (down_proj, gate_proj, k_proj, "
                      "o_proj, q_proj, up_proj, v_proj)"),
    ("lorasb.target_modules=q_proj,query_key_value", "['query_key_value'] match no module"),
    ("lorasb.target_modules=input_layernorm", "is a LlamaRMSNorm, not a torch.nn.Linear"),
    ("lorasb.est_max_accum_gb=0.00001", "lorasb.est_max_accum_gb = 1e-05 is below the fp32 accumulator of"),
    ("lorasb.est_bucket_mb=-1", "lorasb.est_bucket_mb must be 0 or more, got -1"),
])
def test_bad_targets_are_found_from_the_config_alone(tmp_path, capsys, override, needle):
    assert needle in fails(capsys, override, out=tmp_path / "o")


def test_more_estimation_samples_than_data(tmp_path, capsys):
    err = fails(capsys, "data.builtin_size=20", "lorasb.est_samples=50", out=tmp_path / "o")
    assert "lorasb.est_samples is 50 but the dataset has 20 examples" in err


def test_empty_dataset_and_missing_column(tmp_path, capsys):
    assert "is empty" in fails(capsys, f"data.path={write(tmp_path / 'e.jsonl', '')}", out=tmp_path / "o1")
    rows = write(tmp_path / "q.jsonl", '{"question": "1+1?", "response": "2"}\n')
    err = fails(capsys, f"data.path={rows}", out=tmp_path / "o2")
    assert "no column 'query'" in err and "data.query_field" in err


def test_malformed_jsonl_line_is_named_by_its_number(tmp_path, capsys):
    good = '{"query": "1+1?", "response": "2"}\n'
    rows = write(tmp_path / "bad.jsonl", good * 3 + '{"query": "2+2?", "response": 4\n' + good)
    err = fails(capsys, f"data.path={rows}", out=tmp_path / "o")
    assert err.startswith(f"data.path '{rows}' could not be read as JSON Lines: line 4 is not valid JSON")
    assert len(err.strip().splitlines()) == 1


def test_missing_model_path(tmp_path, capsys):
    err = fails(capsys, f"model.name_or_path={tmp_path / 'no-such-model'}", out=tmp_path / "o")
    assert "model.name_or_path: no such directory" in err


def test_output_dir_that_cannot_be_written(tmp_path, capsys):
    blocker = write(tmp_path / "a-file", "x")
    err = fails(capsys, out=os.path.join(blocker, "run"))
    assert "train.output_dir" in err and "is not writable" in err


def test_output_dir_holding_another_run_is_left_untouched(tmp_path, capsys):
    out = tmp_path / "earlier"
    files = {"run_config.json": '{"run": {}}', "metrics.jsonl": '{"step": 1}\n', "notes.txt": "mine"}
    for name, text in files.items():
        write(out / name, text)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    err = fails(capsys, out=out)
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_init_file_from_another_model(tmp_path, capsys):
    init = tmp_path / "init.safetensors"
    meta = {"format": INIT_FORMAT, "model": "other-org/other-model", "target_modules": ["q_proj"], "r": 16}
    save_file({}, str(init), metadata={"lorasb": json.dumps(meta)})
    err = fails(capsys, "--init_file", str(init), out=tmp_path / "o")
    assert "was made for model = 'other-org/other-model'" in err


def test_truncated_init_file(tmp_path, capsys):
    whole = tmp_path / "whole.safetensors"
    meta = {"format": INIT_FORMAT, "model": "builtin:tiny-llama", "target_modules": ["q_proj"], "r": 16}
    save_file({"a.lora_R": torch.zeros(64, 64)}, str(whole), metadata={"lorasb": json.dumps(meta)})
    cut = write(tmp_path / "cut.safetensors", "")
    with open(cut, "wb") as f:
        f.write(whole.read_bytes()[:200])
    err = fails(capsys, "--init_file", cut, out=tmp_path / "o")
    assert err.startswith(f"train.init_file {cut} cannot be read as safetensors") and "truncated" in err
    assert len(err.strip().splitlines()) == 1


def test_model_directory_without_config_json(tmp_path, capsys):
    folder = tmp_path / "weights-only"
    write(folder / "model.safetensors", "")
    err = fails(capsys, f"model.name_or_path={folder}", out=tmp_path / "o")
    assert f"model.name_or_path: '{folder}' holds no config.json" in err


def test_hub_model_that_cannot_be_reached_offline(tmp_path, capsys, monkeypatch):
    """Under HF_HUB_OFFLINE=1 a hub name missing from the cache is one line at once, not retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    err = fails(capsys, "model.name_or_path=no-such-owner/no-such-model", out=tmp_path / "o")
    assert time.monotonic() - start < 15
    assert "model.name_or_path: 'no-such-owner/no-such-model' is no local directory" in err
    assert "HF_HUB_OFFLINE is set" in err and len(err.strip().splitlines()) == 1


def test_not_an_init_file(tmp_path, capsys):
    init = tmp_path / "weights.safetensors"
    save_file({}, str(init))
    assert "is not a LoRA-SB init file" in fails(capsys, "--init_file", str(init), out=tmp_path / "o")


def test_checkpoint_from_another_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    other = load_run_config(None, ["lorasb.r=8"])
    step = out / "checkpoints" / "step00000002"
    write(step / MARKER, json.dumps({"step": 2, "epoch": 0, "micro_batch": 2, "world_size": 1,
                                     "init_file": str(out / "lorasb_init.safetensors"), "init_id": "x",
                                     "run": checkpoint.run_identity(other)}))
    write(out / "run_config.json", "{}")
    err = fails(capsys, "--resume", "auto", out=out)
    assert "made with lorasb.r = 8, this run has 16" in err
    assert (step / MARKER).exists()


def test_resume_path_that_is_not_a_checkpoint(tmp_path, capsys):
    half = tmp_path / "run" / "checkpoints" / "step00000004"
    half.mkdir(parents=True)
    err = fails(capsys, "--resume", str(half), out=tmp_path / "run")
    assert "not a complete checkpoint" in err


def test_dry_run_checks_everything_prints_the_plan_and_starts_nothing(tmp_path, capsys):
    assert main(["train", "--ds_config", ZERO3, "--dry_run", "--output_dir", str(tmp_path / "o"),
                 "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert '"dry_run": true' in out and '"steps": 7' in out and "W0 shard" in out
    assert "GB per rank (host memory / 1 rank(s) on this host): fits: peak" in out and '"fits": true' in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing, not even the folder
    assert "lorasb.r = 100 exceeds" in fails(capsys, "--dry_run", "lorasb.r=100", out=tmp_path / "o2")
    # a device too small: the verdict and the knobs, still nothing written
    assert main(["train", "--ds_config", ZERO3, "--dry_run", "--device_memory_gb", "0.5", "--output_dir",
                 str(tmp_path / "o3")]) == 0
    out = capsys.readouterr().out
    assert "on 0.50 GB per rank (--device_memory_gb): does NOT fit" in out and '"fits": false' in out
    assert "set zero_optimization.reduce_bucket_size" in out and not (tmp_path / "o3").exists()
    for bad in (["--device_memory_gb", "80"], ["--dry_run", "--device_memory_gb", "0"]):
        assert "--device_memory_gb" in fails(capsys, *bad, out=tmp_path / "o4")


def test_resume_auto_without_a_checkpoint_says_it_starts_anew(tmp_path, capsys):
    out = tmp_path / "never-ran"
    assert main(["train", "--ds_config", ZERO3, "--dry_run", "--resume", "auto", "--output_dir", str(out)]) == 0
    assert f"[lorasb] --resume auto: no complete checkpoint in {out}; starting a new run" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, needle", [
    (["train.eval_every=5"], "train.eval_every needs a held-out set: set data.eval_path, data.eval_split or "
                             "data.eval_fraction"),
    (["train.early_stopping_patience=2", "data.eval_fraction=0.1"],
     "train.early_stopping_patience counts validations: set train.eval_every"),
    (["data.eval_fraction=0.1", "data.eval_split=validation"], "set one of them"),
    (["data.eval_fraction=1.5"], "data.eval_fraction must be in [0, 1), got 1.5"),
    (["train.eval_every=-1"], "train.eval_every must be >= 0"),
    (["train.keep_best=true"], "train.keep_best needs a held-out set"),
    (["data.eval_split=validation"], "data.eval_split applies to a directory or hub dataset in data.path"),
    (["data.eval_path=/no/such/rows.jsonl"], "data.eval_path: no such file or directory '/no/such/rows.jsonl'"),
    (["data.eval_fraction=0.999", "data.builtin_size=20"], "data.eval_fraction = 0.999 of 20 rows leaves none"),
])
def test_bad_validation_settings(tmp_path, capsys, overrides, needle):
    assert needle in fails(capsys, *overrides, out=tmp_path / "o")


def test_held_out_rows_in_another_format_are_named_by_their_setting(tmp_path, capsys):
    rows = write(tmp_path / "eval.jsonl", '{"question": "1+1?", "answer": "2"}\n')
    err = fails(capsys, f"data.eval_path={rows}", out=tmp_path / "o")
    assert err.startswith("data.eval_path: ") and "no column 'query'" in err
