"""Model surgery on the built-in tiny Llama: which modules are wrapped, what is frozen, the counts."""

import re

import pytest
import torch
import torch.nn as nn
from transformers import LlamaForCausalLM

from lorasb_ds.config import LLAMA_TARGETS, ConfigError
from lorasb_ds.layer import LoRASBLinear
from lorasb_ds.modeling import tiny_llama, tiny_llama_config
from lorasb_ds.surgery import count_parameters, find_targets, wrap_targets

LAYERS = 4  # tiny_llama_config().num_hidden_layers


@pytest.fixture
def model():
    return tiny_llama()


def test_tiny_llama_has_four_layers():
    assert tiny_llama_config().num_hidden_layers == LAYERS


def test_default_targets_wrap_seven_modules_per_layer(model):
    layers = wrap_targets(model, LLAMA_TARGETS, r=4)
    assert len(layers) == 7 * LAYERS
    expected = {f"model.layers.{i}.{block}.{t}" for i in range(LAYERS)
                for block, names in (("self_attn", LLAMA_TARGETS[:4]), ("mlp", LLAMA_TARGETS[4:]))
                for t in names}
    assert set(layers) == expected


def test_wrapped_modules_replace_the_linears_in_the_tree(model):
    originals = {name: model.get_submodule(name) for name, _ in model.named_modules()
                 if name.rsplit(".", 1)[-1] in LLAMA_TARGETS}
    layers = wrap_targets(model, LLAMA_TARGETS, r=4)
    for name, layer in layers.items():
        assert model.get_submodule(name) is layer
        assert isinstance(layer, LoRASBLinear)
        assert layer.base is originals[name]  # the original Linear (and its W0) is kept inside
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRASBLinear)]
    assert sorted(wrapped) == sorted(layers)
    # every bare Linear left is either a wrapped base or the lm_head
    bare = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(bare) == sorted([f"{n}.base" for n in layers] + ["lm_head"])


def test_only_R_matrices_stay_trainable(model):
    layers = wrap_targets(model, LLAMA_TARGETS, r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_R" for n in layers}


def test_wrapped_model_computes_the_same_as_before(model):
    """R starts at zero, so the wrapped model's logits are the original ones."""
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        wrap_targets(model, LLAMA_TARGETS, r=4)
        after = model(ids).logits
    assert torch.equal(before, after)


def test_subset_of_targets(model):
    layers = wrap_targets(model, ["q_proj", "v_proj"], r=2)
    assert len(layers) == 2 * LAYERS
    assert all(n.endswith((".q_proj", ".v_proj")) for n in layers)
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


def test_unknown_suffix_names_it_and_lists_linears(model):
    with pytest.raises(ConfigError) as e:
        find_targets(model, ["q_proj", "qkv_proj"], r=4)
    msg = str(e.value)
    assert "qkv_proj" in msg and "lorasb.target_modules" in msg
    for linear in LLAMA_TARGETS + ["lm_head"]:
        assert linear in msg


@pytest.mark.parametrize("target, kind", [("input_layernorm", "LlamaRMSNorm"), ("mlp", "LlamaMLP")])
def test_non_linear_target_names_module_and_type(model, target, kind):
    with pytest.raises(ConfigError, match=rf"'model\.layers\.0\.{target}' is a {kind}"):
        find_targets(model, [target], r=4)


def test_rank_above_smallest_side_names_setting_and_module(model):
    # k_proj and v_proj are 64 x 128 (2 key-value heads of 32); q_proj is 128 x 128.
    find_targets(model, ["k_proj"], r=64)
    with pytest.raises(ConfigError) as e:
        find_targets(model, ["q_proj", "k_proj"], r=65)
    msg = str(e.value)
    assert "lorasb.r" in msg and "65" in msg and "model.layers.0.self_attn.k_proj" in msg


def test_wrapping_twice_is_an_error(model):
    wrap_targets(model, LLAMA_TARGETS, r=4)
    with pytest.raises(ConfigError, match="already a LoRA-SB layer"):
        wrap_targets(model, LLAMA_TARGETS, r=4)


def test_failed_check_leaves_model_untouched(model):
    """find_targets raises before anything is replaced or frozen."""
    with pytest.raises(ConfigError):
        wrap_targets(model, ["q_proj", "nonexistent"], r=4)
    assert not any(isinstance(m, LoRASBLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("r", [1, 4])
def test_parameter_counts(model, r):
    original = sum(p.numel() for p in model.parameters())
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if n.rsplit(".", 1)[-1] in LLAMA_TARGETS}
    layers = wrap_targets(model, LLAMA_TARGETS, r=r)
    counts = count_parameters(model, layers)
    assert counts.trainable == 7 * LAYERS * r * r
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.adapter_frozen == sum((o + i) * r for o, i in shapes.values())
    assert counts.adapter_frozen == sum(b.numel() for b in model.buffers() if b.dim() == 2)
    assert counts.base == original
    assert "trainable" in counts.describe()


def test_find_targets_on_meta_model():
    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_llama_config())
    assert meta.model.layers[0].self_attn.q_proj.weight.is_meta
    found = find_targets(meta, LLAMA_TARGETS, r=8)
    assert len(found) == 7 * LAYERS
    names = [n for n, _ in found]
    in_model_order = [n for n, _ in meta.named_modules() if n in set(names)]
    assert names == in_model_order
    with pytest.raises(ConfigError, match=re.escape("k_proj")):
        find_targets(meta, LLAMA_TARGETS, r=65)


@pytest.mark.parametrize("method,trained_suffixes", [
    ("lorasb", {"lora_R"}), ("loraxs", {"lora_R"}), ("lora", {"lora_B", "lora_A"}), ("full", None),
])
def test_each_method_trains_what_its_row_of_the_table_says(model, method, trained_suffixes):
    """methods.METHODS: LoRA-SB and LoRA-XS train R, LoRA trains B and A, full trains every weight."""
    layers = wrap_targets(model, LLAMA_TARGETS, r=4, method=method)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    if trained_suffixes is None:
        assert layers == {} and len(trained) == len(list(model.parameters()))
        return
    assert {name.rsplit(".", 1)[1] for name in trained} == trained_suffixes
    assert len(trained) == len(trained_suffixes) * len(layers) == len(trained_suffixes) * 7 * LAYERS
