"""Model loading: ``from_pretrained`` without ZeRO-3; under ZeRO-3 the partitioned loader, where each
rank reads only its slice of each weight from the safetensors files (``lorasb_ds/zero3_loading.py``).

The 2-rank loads run once in ``workers/load_worker.py`` (``stage3_param_persistence_threshold: 0``,
so every weight is really partitioned); the checks compare what it gathered with the saved weights.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import torchrun
from lorasb_ds.config import ConfigError, ModelConfig
from lorasb_ds.modeling import (check_model_source, load_model, load_pretrained, safetensors_dir, tiny_llama,
                                tiny_tokenizer)
from lorasb_ds.zero3_loading import INDEX_FILE, checkpoint_tensors, read_flat

WORKER = os.path.join(os.path.dirname(__file__), "workers", "load_worker.py")
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
MiB = 1 << 20


def odd_llama(tied: bool) -> LlamaForCausalLM:
    """Odd sizes (hidden 75, vocab 131, MLP 97): most weights end in a padded partition at world 2,
    and partition boundaries fall inside rows."""
    config = LlamaConfig(vocab_size=131, hidden_size=75, intermediate_size=97, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=26,
                         tie_word_embeddings=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return LlamaForCausalLM(config)


def save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_saved")
    model = tiny_llama()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def checkpoints(saved_model, tmp_path_factory):
    """name -> (directory, reference model): single file, sharded, tied and sharded."""
    root = tmp_path_factory.mktemp("checkpoints")
    tiny, tied = tiny_llama(), odd_llama(tied=True)
    return {
        "single": (str(saved_model[0]), saved_model[1]),
        "sharded": (save(tiny, root / "sharded", max_shard_size="300KB"), tiny),
        "tied": (save(tied, root / "tied", max_shard_size="40KB"), tied),
    }


@pytest.fixture(scope="module")
def loaded(checkpoints, tmp_path_factory):
    """One 2-rank run of the worker over every case; tag -> (gathered tensors, per-rank reports)."""
    out = tmp_path_factory.mktemp("loaded")
    jobs = {"single": ("single", "fp32"), "sharded": ("sharded", "fp32"), "tied": ("tied", "fp32"),
            "bf16": ("sharded", "bf16"), "offload": ("tied", "fp32:offload"), "seqcls": ("sharded", "fp32:seqcls")}
    torchrun(2, WORKER, str(out), *(f"{tag}:{checkpoints[c][0]}:{how}" for tag, (c, how) in jobs.items()))
    return {tag: (load_file(out / f"{tag}.safetensors"),
                  [json.load(open(out / f"{tag}.rank{k}.json")) for k in range(2)]) for tag in jobs}


def test_tiny_default_is_deterministic():
    a, b = tiny_llama(), tiny_llama()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_missing_local_model_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ConfigError, match="model.name_or_path"):
        check_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    # a hub name is looked up now (config.json only), so a name that cannot be had fails here, in one line
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="'some-org/some-model' is no local directory"):
        check_model_source(ModelConfig(name_or_path="some-org/some-model"))


def test_load_without_zero3_gives_the_saved_weights(saved_model):
    path, ref = saved_model
    model = load_model(ModelConfig(name_or_path=str(path)), {"zero_optimization": {"stage": 2}}, torch.float32)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.slow  # a 2-process torchrun
@pytest.mark.parametrize("tag", ["single", "sharded", "tied", "offload"])
def test_zero3_load_is_partitioned_on_every_rank(loaded, checkpoints, tag):
    _, reports = loaded[tag]
    ref = checkpoints["tied" if tag == "offload" else tag][1]
    full = sum(p.numel() for p in ref.parameters())
    for r in reports:
        assert r["all_partitioned"], r["rank"]
        assert r["full_elements"] == full
        n_params = len(list(ref.parameters()))
        assert full // 2 <= r["local_elements"] <= full // 2 + n_params  # a half share (+ padding)
        assert not r["training"]  # eval mode, as from_pretrained returns a model


@pytest.mark.slow  # a 2-process torchrun
@pytest.mark.parametrize("tag", ["single", "sharded", "tied", "offload"])
def test_zero3_load_gives_the_saved_weights_bitwise(loaded, checkpoints, tag):
    gathered, _ = loaded[tag]
    ref = checkpoints["tied" if tag == "offload" else tag][1]
    for name, p in ref.named_parameters(remove_duplicate=False):
        assert gathered[name].dtype == torch.float32
        assert torch.equal(gathered[name], p.detach()), name


@pytest.mark.slow  # a 2-process torchrun
def test_tied_checkpoint_holds_one_copy_and_loads_tied(loaded, checkpoints):
    path, ref = checkpoints["tied"]
    keys = checkpoint_tensors(path)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert len(json.load(open(os.path.join(path, INDEX_FILE)))["weight_map"]) == len(keys)
    assert len(set(path for path, _ in keys.values())) > 3  # really sharded
    gathered, reports = loaded["tied"]
    assert torch.equal(gathered["lm_head.weight"], gathered["model.embed_tokens.weight"])
    assert reports[0]["full_elements"] == sum(p.numel() for p in ref.parameters())  # counted once


@pytest.mark.slow  # a 2-process torchrun
def test_bf16_load_from_an_fp32_checkpoint_equals_the_cast(loaded, checkpoints):
    gathered, _ = loaded["bf16"]
    for name, p in checkpoints["sharded"][1].named_parameters():
        assert gathered[name].dtype == torch.bfloat16
        assert torch.equal(gathered[name], p.detach().to(torch.bfloat16)), name


@pytest.mark.slow  # a 2-process torchrun
@pytest.mark.parametrize("tag,dtype", [("sharded", torch.float32), ("bf16", torch.bfloat16),
                                       ("tied", torch.float32)])
def test_buffers_equal_those_of_from_pretrained(loaded, checkpoints, tag, dtype):
    """Non-persistent buffers (rotary inv_freq) are computed at construction: zero.Init must not
    change them."""
    gathered, _ = loaded[tag]
    ref = AutoModelForCausalLM.from_pretrained(checkpoints["sharded" if tag == "bf16" else tag][0], dtype=dtype)
    buffers = dict(ref.named_buffers())
    assert buffers and {k for k in gathered if k.startswith("buffer:")} == {f"buffer:{n}" for n in buffers}
    for name, b in buffers.items():
        assert gathered[f"buffer:{name}"].dtype == b.dtype, name
        assert torch.equal(gathered[f"buffer:{name}"], b), name


@pytest.mark.slow  # a 2-process torchrun
def test_a_new_head_is_initialized_and_an_unused_one_skipped(loaded, checkpoints):
    """LlamaForSequenceClassification from a causal-LM checkpoint: ``score`` is new, ``lm_head`` unused."""
    gathered, reports = loaded["seqcls"]
    ref = checkpoints["sharded"][1]
    for name, p in ref.model.named_parameters():
        assert torch.equal(gathered[f"model.{name}"], p.detach()), name
    score = gathered["score.weight"]
    assert score.shape == (3, 128) and "lm_head.weight" not in gathered
    assert torch.isfinite(score).all() and 0.01 < score.std() < 0.03  # normal(0, initializer_range=0.02)
    assert all(r["all_partitioned"] for r in reports)


def test_read_flat_reads_any_range_in_small_blocks(checkpoints):
    keys = checkpoint_tensors(checkpoints["tied"][0])
    for key, (path, shape) in keys.items():
        with safe_open(path, framework="pt") as f:
            flat = f.get_tensor(key).reshape(-1)
        n = flat.numel()
        for start, stop in [(0, n), (n // 3, n - n // 5), (n - 1, n), (n // 2, n // 2 + 1)]:
            out = torch.empty(stop - start, dtype=torch.float64)
            read_flat(path, key, start, out, block_bytes=1000)  # a few rows per block
            assert torch.equal(out, flat[start:stop].double()), (key, start, stop)


def drop_tensor(src: str, dst, key: str) -> str:
    """A copy of a single-file checkpoint without ``key``."""
    from safetensors.torch import save_file

    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "model.safetensors":
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors[key]
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_a_missing_weight_is_a_config_error_naming_it(saved_model, tmp_path):
    """Checked on a meta-device copy before anything is partitioned: no process group needed."""
    path = drop_tensor(str(saved_model[0]), tmp_path / "bad", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match=r"missing from the checkpoint: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ModelConfig(name_or_path=path), ZERO3, torch.float32)


def test_an_unexpected_or_misshapen_weight_is_a_config_error(saved_model, tmp_path):
    from safetensors.torch import save_file

    path = drop_tensor(str(saved_model[0]), tmp_path / "bad", "model.norm.weight")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.extra.weight"] = torch.zeros(3)
    tensors["model.norm.weight"] = torch.ones(127)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"not in the model: model\.extra\.weight.*wrong shape: "
                                          r"model\.norm\.weight: checkpoint \[127\], model \[128\]"):
        load_model(ModelConfig(name_or_path=path), ZERO3, torch.float32)


def test_a_directory_without_safetensors_is_left_to_from_pretrained(saved_model, tmp_path):
    assert safetensors_dir(str(saved_model[0])) == str(saved_model[0])
    (tmp_path / "config.json").write_text("{}")
    assert safetensors_dir(str(tmp_path)) is None


def test_a_hub_name_fetches_only_the_config_and_safetensors_files(saved_model, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: calls.append((repo, allow_patterns)) or str(saved_model[0]))
    assert safetensors_dir("some-org/some-model") == str(saved_model[0])
    assert calls == [("some-org/some-model", ["*.json", "model*.safetensors"])]


class Unbuildable:
    """An auto class whose ``from_config`` fails (as remote code it cannot resolve would)."""

    @staticmethod
    def from_config(config, **kwargs):
        raise ValueError("unrecognized configuration class")

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        return ("from_pretrained", path, is_deepspeed_zero3_enabled())


@pytest.mark.parametrize("ds_config,why", [
    (ZERO3, "from_config cannot build it: ValueError: unrecognized configuration class"),
    ({**ZERO3, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "NVMe"),
])
def test_what_the_partitioned_loader_cannot_do_falls_back_to_from_pretrained(saved_model, ds_config, why, capsys):
    path = str(saved_model[0])
    assert load_pretrained(Unbuildable, ModelConfig(name_or_path=path), ds_config, torch.float32) == \
        ("from_pretrained", path, True)  # under a live HfDeepSpeedConfig: partitioned while it loads
    out = capsys.readouterr().out
    assert "warning: loading" in out and why in out


@pytest.fixture(scope="module")
def rss_checkpoint(tmp_path_factory):
    """A 168M-parameter Llama (642 MiB fp32) saved in 7 shards."""
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # the values do not matter here, only the sizes
        model = LlamaForCausalLM(config)
    path = save(model, tmp_path_factory.mktemp("rss_model"), max_shard_size="100MB")
    return path, sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.slow  # a 2-process torchrun
def test_zero3_load_never_holds_a_full_copy_per_rank(rss_checkpoint, tmp_path):
    path, full_bytes = rss_checkpoint
    torchrun(2, WORKER, str(tmp_path), f"rss:{path}:fp32:rss")
    reports = [json.load(open(tmp_path / f"rss.rank{k}.json")) for k in range(2)]
    for r in reports:
        growth = r["hwm"] - r["rss_before"]
        print(f"rank {r['rank']}: model {full_bytes / MiB:.0f} MiB, partition {r['local_bytes'] / MiB:.0f} MiB, "
              f"RSS before {r['rss_before'] / MiB:.0f} MiB, peak growth {growth / MiB:.0f} MiB "
              f"({growth / full_bytes:.2f} of the model), after {r['rss_after'] / MiB:.0f} MiB "
              f"(peak reset before loading: {r['peak_was_reset']})")
        assert r["full_bytes"] == full_bytes and r["all_partitioned"]
        assert growth < 0.75 * full_bytes, r
