"""Export of a trained adapter (export.py): PEFT round trip, shard-by-shard merge, its memory, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import REPO
from lorasb_ds.cli import main as cli_main
from lorasb_ds.config import LLAMA_TARGETS, ConfigError
from lorasb_ds.export import export_peft, merge_checkpoint
from lorasb_ds.files import LayerInit, load_adapter, save_adapter, save_init_file
from lorasb_ds.init import new_init_id
from lorasb_ds.modeling import tiny_llama, tiny_tokenizer
from lorasb_ds.surgery import wrap_targets

R = 4
TOL = 1e-4


# --------------------------------------------------------------------------- helpers


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """(rows x cols) with orthonormal columns (rows >= cols)."""
    Q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return Q


def write_adapter(model, adapter_dir, r=R, seed=0, model_name="builtin:tiny-llama", init_id=None):
    """Wrap ``model`` in place with random orthonormal B, A and random R0, R; write the adapter files
    exactly as a training run does. Returns {name: LoRASBLinear} holding the trained R."""
    layers = wrap_targets(model, LLAMA_TARGETS, r)
    gen = torch.Generator().manual_seed(seed)
    inits, trained = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            B = orthonormal(layer.out_features, r, gen)  # (out, r)
            A = orthonormal(layer.in_features, r, gen).T.contiguous()  # (r, in)
            R0 = torch.randn(r, r, generator=gen)
            inits[name] = LayerInit(B, A, R0, energy=1.0)
            trained[f"{name}.lora_R"] = R0 + 0.5 * torch.randn(r, r, generator=gen)
            layer.lora_B.copy_(B)
            layer.lora_A.copy_(A)
            layer.lora_R.copy_(trained[f"{name}.lora_R"])
    meta = {"model": model_name, "target_modules": list(LLAMA_TARGETS), "r": r,
            "init_id": init_id or new_init_id()}
    init_path = os.path.join(os.path.dirname(str(adapter_dir)), "run_init.safetensors")
    save_init_file(init_path, inits, meta)
    save_adapter(str(adapter_dir), trained, init_path, meta)
    return layers


def token_batch(vocab=128, seed=3) -> torch.Tensor:
    return torch.randint(3, vocab, (3, 17), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


def load_fp32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def shard_files(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A sharded tiny Llama (fp32, with tokenizer) and an adapter; the LoRA-SB model's logits."""
    root = tmp_path_factory.mktemp("export")
    base_dir = root / "base"
    tiny_llama().save_pretrained(base_dir, max_shard_size="300KB")
    tiny_tokenizer().save_pretrained(base_dir)
    wrapped = load_fp32(base_dir)
    ids = token_batch()
    base_logits = logits(wrapped, ids)
    write_adapter(wrapped, root / "adapter")
    return {"root": root, "base": str(base_dir), "adapter": str(root / "adapter"), "ids": ids,
            "base_logits": base_logits, "lorasb_logits": logits(wrapped, ids)}


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- load_adapter


def test_load_adapter_returns_trained_R(setup):
    adapter, _, meta = load_adapter(setup["adapter"])
    assert meta["format"] == "lorasb-adapter-v1" and meta["r"] == R
    assert len(adapter) == 4 * len(LLAMA_TARGETS)
    trained = load_file(os.path.join(setup["adapter"], "lorasb_adapter.safetensors"))
    for name, (B, A, Rm) in adapter.items():
        assert B.dtype == A.dtype == Rm.dtype == torch.float32
        assert B.shape[1] == A.shape[0] == R and Rm.shape == (R, R)
        torch.testing.assert_close(Rm, trained[f"{name}.lora_R"], rtol=0, atol=0)


# --------------------------------------------------------------------------- PEFT


def test_peft_round_trip(setup, tmp_path, monkeypatch):
    import peft
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "peft"
    export_peft(setup["adapter"], str(out), base_model=setup["base"])
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    config = json.loads((out / "adapter_config.json").read_text())
    expected = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": R, "lora_dropout": 0.0,
                "bias": "none", "target_modules": LLAMA_TARGETS, "base_model_name_or_path": setup["base"],
                "use_rslora": False, "use_dora": False, "fan_in_fan_out": False}
    assert {k: config[k] for k in expected} == expected

    adapter, _, _ = load_adapter(setup["adapter"])
    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}.lora_{m}.weight" for n in adapter for m in "AB"}
    for name, (B, A, Rm) in adapter.items():
        torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_A.weight"], A, rtol=0, atol=0)
        torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_B.weight"], B @ Rm)

    peft_model = peft.PeftModel.from_pretrained(load_fp32(setup["base"]), str(out))
    got = logits(peft_model, setup["ids"])
    diff = max_diff(got, setup["lorasb_logits"])
    print(f"\nPEFT vs LoRA-SB logits: max |diff| = {diff:.3g} "
          f"(adapter moves them by {max_diff(setup['lorasb_logits'], setup['base_logits']):.3g})")
    assert max_diff(setup["lorasb_logits"], setup["base_logits"]) > 1e-2  # the adapter does something
    assert diff <= TOL


def test_export_of_the_builtin_model_names_a_base_that_resolves(setup, tmp_path, monkeypatch):
    """Without --base_model the training model is recorded as from_pretrained can load it: for the
    built-in Llama, the checkpoint the package ships; AutoPeftModelForCausalLM then needs nothing else."""
    from peft import AutoPeftModelForCausalLM

    from lorasb_ds.modeling import TINY_LLAMA_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["export", "--adapter", setup["adapter"], "--out", str(tmp_path / "p")]) == 0
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_LLAMA_DIR
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "p"), dtype=torch.float32)
    assert max_diff(logits(model, setup["ids"]), setup["lorasb_logits"]) <= TOL
    card = (tmp_path / "p" / "README.md").read_text()
    assert f"- rank r: {R}" in card and f"- base model: {TINY_LLAMA_DIR}" in card
    assert "AutoPeftModelForCausalLM.from_pretrained(" in card and "--max-lora-rank 8" in card


def test_model_card_states_the_training_and_the_vllm_rank():
    from lorasb_ds.export import model_card

    meta = {"method": "lorasb", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 96, "task": "causal_lm",
            "target_modules": ["q_proj", "v_proj"],
            "training": {"data": "data/word_problems/train.jsonl (metamath, 1500 samples)", "steps": 40,
                         "global_batch": 8, "trainable_parameters": 1935360, "final_loss": 0.0801,
                         "best_eval_loss": 0.1234, "stopped_early": False}}
    card = model_card(meta, {"base_model_name_or_path": meta["model"]}, "/tmp/peft")
    for line in ("- method: LoRA-SB (arXiv 2411.19557)", "- rank r: 96", "- trained numbers: 1,935,360",
                 "- data: data/word_problems/train.jsonl (metamath, 1500 samples)", "- optimizer steps: 40",
                 "- final training loss: 0.0801", "- best validation loss: 0.1234",
                 "`--enable-lora --max-lora-rank 128`"):
        assert line in card, line
    assert "above every value it accepts" in model_card(dict(meta, r=600), {"base_model_name_or_path": "m"}, "/o")


# --------------------------------------------------------------------------- merge


def test_merge_matches_lorasb_model(setup, tmp_path):
    base, out = setup["base"], tmp_path / "merged"
    shards = shard_files(base)
    assert len(shards) >= 4 and os.path.isfile(os.path.join(base, "model.safetensors.index.json"))
    assert cli_main(["merge", "--base_model", base, "--adapter", setup["adapter"], "--out", str(out)]) == 0

    # every other file unchanged, the shards present under the same names
    assert sorted(os.listdir(out)) == sorted(os.listdir(base))
    for f in os.listdir(base):
        if f not in shards:
            assert (out / f).read_bytes() == open(os.path.join(base, f), "rb").read(), f

    targets = {f"{name}.weight" for name in load_adapter(setup["adapter"])[0]}
    for shard in shards:
        before, after = load_file(os.path.join(base, shard)), load_file(out / shard)
        assert set(before) == set(after)
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == safe_open(os.path.join(base, shard), "pt").metadata()
        for key in before:
            assert after[key].dtype == before[key].dtype
            if key not in targets:
                assert torch.equal(after[key], before[key]), key  # bitwise
            else:
                assert not torch.equal(after[key], before[key]), key

    diff = max_diff(logits(load_fp32(out), setup["ids"]), setup["lorasb_logits"])
    print(f"\nmerged vs LoRA-SB logits: max |diff| = {diff:.3g} over {len(shards)} shards")
    assert diff <= TOL


def test_merge_single_file_checkpoint(setup, tmp_path):
    """No index: the one ``model.safetensors`` is the only shard."""
    base = tmp_path / "single"
    load_fp32(setup["base"]).save_pretrained(base)
    assert shard_files(base) == ["model.safetensors"]
    (base / "README.md").write_text("# the base model's card\n")
    out = tmp_path / "merged"
    out.mkdir()  # an existing empty directory is fine
    merge_checkpoint(str(base), setup["adapter"], str(out))
    assert not (out / "README.md").exists()  # it describes the base model, not the merged one
    assert max_diff(logits(load_fp32(out), setup["ids"]), setup["lorasb_logits"]) <= TOL


def test_written_weights_get_the_mode_of_the_other_files(setup, tmp_path):
    """safetensors writes its files 0600; the adapter, its init file and merged shards are 0666 less the
    umask, as every other file of a run or a checkpoint directory."""
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    assert umask & 0o044 == 0, "the test needs a umask that lets others read"
    modes = {f: os.stat(os.path.join(setup["adapter"], f)).st_mode & 0o777 for f in os.listdir(setup["adapter"])}
    assert set(modes.values()) == {want}, modes
    out = tmp_path / "merged"
    merge_checkpoint(setup["base"], setup["adapter"], str(out))
    assert {os.stat(out / shard).st_mode & 0o777 for shard in shard_files(setup["base"])} == {want}


# --------------------------------------------------------------------------- merge memory

PEAK_RSS = """
import os, resource, sys
import lorasb_ds.cli, lorasb_ds.export  # the same imports in the measured run and the baseline

def peak_kib():
    # VmHWM is this process's own peak; ru_maxrss may also count the parent's (kept across exec).
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

rc = lorasb_ds.cli.main(sys.argv[1:]) if sys.argv[1:] else 0
print("PEAK_KIB", peak_kib())
sys.exit(rc)
"""


def peak_rss_bytes(*args: str) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return 1024 * int(proc.stdout.split("PEAK_KIB")[-1])


def test_merge_memory_is_one_shard(tmp_path):
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).float()
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="50MB")
    adapter_dir = tmp_path / "adapter"
    write_adapter(model, adapter_dir, r=8, model_name=str(base))
    del model
    shards = shard_files(base)
    largest = max(os.path.getsize(base / s) for s in shards)
    total = sum(os.path.getsize(base / s) for s in shards)
    adapter_bytes = sum(os.path.getsize(adapter_dir / f) for f in os.listdir(adapter_dir))
    assert len(shards) >= 4

    baseline = peak_rss_bytes()
    peak = peak_rss_bytes("merge", "--base_model", str(base), "--adapter", str(adapter_dir),
                          "--out", str(tmp_path / "merged"))
    assert shard_files(tmp_path / "merged") == shards
    mb = 2 ** 20
    print(f"\nmerge peak RSS {peak / mb:.0f} MiB, import baseline {baseline / mb:.0f} MiB, "
          f"increase {(peak - baseline) / mb:.0f} MiB; largest shard {largest / mb:.0f} MiB, "
          f"{len(shards)} shards, checkpoint {total / mb:.0f} MiB, adapter {adapter_bytes / mb:.1f} MiB")
    assert peak - baseline < 2 * largest + adapter_bytes


# --------------------------------------------------------------------------- errors


@pytest.fixture
def adapter_copy(tmp_path):
    """A fresh adapter (tiny model) that a test may damage."""
    write_adapter(tiny_llama(), tmp_path / "adapter")
    return tmp_path / "adapter"


def test_mismatched_init_id(adapter_copy):
    init_path = adapter_copy / "lorasb_init.safetensors"
    with safe_open(init_path, "pt") as f:
        meta = json.loads(f.metadata()["lorasb"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["init_id"] = new_init_id()
    save_file(tensors, init_path, metadata={"lorasb": json.dumps(meta)})
    with pytest.raises(ConfigError, match="--adapter .*init_id"):
        load_adapter(str(adapter_copy))


@pytest.mark.parametrize("missing", ["lorasb_init.safetensors", "lorasb_adapter.safetensors"])
def test_missing_file(adapter_copy, missing):
    os.remove(adapter_copy / missing)
    with pytest.raises(ConfigError, match=f"--adapter .*no file {missing}"):
        load_adapter(str(adapter_copy))


def test_wrong_format(adapter_copy):
    save_file({"x": torch.zeros(1)}, adapter_copy / "lorasb_adapter.safetensors",
              metadata={"lorasb": json.dumps({"format": "something-else"})})
    with pytest.raises(ConfigError, match="format 'something-else'"):
        load_adapter(str(adapter_copy))


def test_out_dir_checks(setup, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--out .*not an empty directory"):
        merge_checkpoint(setup["base"], setup["adapter"], str(busy))
    assert os.listdir(busy) == ["keep.txt"]
    with pytest.raises(ConfigError, match="--out .*is the base model directory"):
        merge_checkpoint(setup["base"], setup["adapter"], setup["base"])
    with pytest.raises(ConfigError, match="--out .*inside the base model directory"):
        merge_checkpoint(setup["base"], setup["adapter"], os.path.join(setup["base"], "merged"))
    # through the command: message and exit status 2, as for train
    assert cli_main(["merge", "--base_model", setup["base"], "--adapter", setup["adapter"],
                     "--out", str(busy)]) == 2
    assert "lorasb: error: --out" in capsys.readouterr().err


def test_missing_target_weight(setup, tmp_path):
    base = tmp_path / "base"
    load_fp32(setup["base"]).save_pretrained(base)
    tensors = load_file(base / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    with pytest.raises(ConfigError, match=r"--base_model .*model\.layers\.2\.mlp\.up_proj\.weight"):
        merge_checkpoint(str(base), setup["adapter"], str(out))
    assert not out.exists() and os.listdir(tmp_path) == ["base"]  # nothing half-written


def test_wrong_base_model_shape(setup, tmp_path):
    """An adapter trained on another model: the shapes of the target weights differ."""
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="--base_model .*the adapter expects"):
        merge_checkpoint(str(tmp_path / "other"), setup["adapter"], str(tmp_path / "merged"))


def test_the_builtin_classifier_is_saved_beside_its_export(tmp_path):
    """The built-in RoBERTa is built from code: its export gets a copy (with the trained head's size)
    that AutoModelForSequenceClassification loads as the same model."""
    from transformers import AutoModelForSequenceClassification

    from lorasb_ds.export import resolvable_base_model
    from lorasb_ds.modeling import tiny_roberta

    path = resolvable_base_model({"model": "builtin:tiny-roberta"},
                                 {"classifier.out_proj.weight": torch.zeros(3, 64)}, str(tmp_path))
    assert path == str(tmp_path / "base_model")
    loaded = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    reference = tiny_roberta(3)
    assert loaded.config.num_labels == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
