"""The memory planner: SPEC §3 figures for a 70B Llama, its arithmetic against real tensors of a small
model, the activation formula against what autograd saves, check_fit, the CLI, DeepSpeed's estimator."""

import math
import os
import subprocess
import sys

import pytest
import torch

from lorasb_ds.cli import main as cli_main
from lorasb_ds.config import LLAMA_TARGETS, ConfigError
from lorasb_ds.estimate import OwnerReducer, _WeightGradTap, assign_owners
from lorasb_ds.modeling import tiny_llama, tiny_llama_config
from lorasb_ds.plan import (GB, activation_bytes, check_fit, deepspeed_estimate, describe_model, fewest_passes,
                            format_plan, plan_memory, replan, target_shapes, total_parameters)
from lorasb_ds.surgery import wrap_targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "configs", "models")
L70B = os.path.join(MODELS, "llama-3.1-70b.json")


def near(value: float, expected: float, rel: float) -> bool:
    return abs(value - expected) <= rel * expected


@pytest.fixture(scope="module")
def plan70():
    """Llama-3.1-70B, r = 96, the seven projections, 64 ranks, bf16, micro-batch 1, 2048 tokens."""
    return plan_memory(L70B, r=96, target_modules=LLAMA_TARGETS, world_size=64, micro_batch=1, seq_len=2048)


# ----------------------------------------------------------------------------------- SPEC §3


def test_70b_figures_match_the_spec(plan70):
    p = plan70
    assert len(p.model.shapes) == 560
    assert near(p.model.target_params, 68.5e9, 0.01)
    assert near(p.w0_shard, 2.2 * GB, 0.05)
    assert near(p.owner_accumulator_max, 4.3 * GB, 0.10)
    assert near(p.reference_accumulators, 274 * GB, 0.01)
    assert near(p.b_and_a, 2.5 * GB, 0.02) and near(p.b_a_elements, 1.24e9, 0.01)
    assert near(p.r_params, 5.2e6, 0.01)
    assert near(p.r_optimizer_total, 62e6, 0.01)
    assert p.r_optimizer == math.ceil(p.r_optimizer_total / 64)
    assert near(replan(p, world_size=8).owner_accumulator_max, 34 * GB, 0.02)


def test_70b_one_layer_of_targets(plan70):
    layer0 = {n.rsplit(".", 1)[-1]: o * i for n, (o, i) in plan70.model.shapes.items() if ".layers.0." in n}
    assert near(4 * sum(layer0.values()), 3.42 * GB, 0.01)
    for mlp in ("gate_proj", "up_proj", "down_proj"):
        assert near(4 * layer0[mlp], 940e6, 0.01)


def test_shipped_model_configs_have_the_published_sizes():
    published = {"llama-3.1-70b.json": 70_553_706_496, "llama-3.1-8b.json": 8_030_261_248,
                 "llama-3.2-3b.json": 3_212_749_824, "mistral-7b.json": 7_241_732_096}
    assert set(published) <= set(os.listdir(MODELS))
    for name, total in published.items():
        assert total_parameters(os.path.join(MODELS, name)) == total, name
    # SPEC §1: trainable counts with r = 96 (Llama-3.2-3B) and r = 64 (Mistral-7B)
    assert len(target_shapes(os.path.join(MODELS, "llama-3.2-3b.json"), LLAMA_TARGETS, 96)) * 96**2 == 1_806_336
    assert len(target_shapes(os.path.join(MODELS, "mistral-7b.json"), LLAMA_TARGETS, 64)) * 64**2 == 917_504


def test_a_directory_holding_config_json_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(MODELS, "llama-3.2-3b.json")).read())
    assert total_parameters(str(tmp_path)) == 3_212_749_824
    with pytest.raises(ConfigError, match="no such file"):
        total_parameters(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------------- against real tensors


def test_arithmetic_matches_the_real_tensors_of_a_small_model():
    world, r = 3, 8
    model = tiny_llama(torch.float32)
    total = sum(p.numel() for p in model.parameters())
    layers = wrap_targets(model, LLAMA_TARGETS, r)
    plan = plan_memory(tiny_llama_config(), r=r, world_size=world, micro_batch=2, seq_len=16, dtype="fp32")

    assert plan.model.total_params == total
    assert plan.model.target_params == sum(layer.base.weight.numel() for layer in layers.values())
    assert plan.b_a_elements == sum(layer.lora_B.numel() + layer.lora_A.numel() for layer in layers.values())
    assert plan.b_and_a == sum(layer.lora_B.nbytes + layer.lora_A.nbytes for layer in layers.values())
    assert plan.r_params == sum(layer.lora_R.numel() for layer in layers.values())
    assert plan.r_low_precision == sum(layer.lora_R.nbytes for layer in layers.values())
    assert plan.w0_shard == math.ceil(total / world) * 4

    shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
    assert plan.model.shapes == shapes
    owners = assign_owners(shapes, world)
    for rank in range(world):
        reducer = OwnerReducer(layers, owners, rank, torch.device("cpu"))  # allocates the real accumulators
        assert plan.owner_accumulators[rank] == sum(g.nbytes for g in reducer.grads.values())
    assert plan.owner_accumulator_max == max(plan.owner_accumulators)
    assert plan.reference_accumulators == 4 * sum(layer.base.weight.numel() for layer in layers.values())


def test_largest_module_is_what_deepspeed_counts():
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = tiny_llama()
    total, largest = model_to_params(model)
    shape = describe_model(tiny_llama_config())
    assert (shape.total_params, shape.largest_module_params) == (total, largest)
    assert shape.largest_layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


def test_traffic_per_micro_step(plan70):
    p, w = plan70, 64
    gathers = 2 * p.model.total_params * 2 * (w - 1) / w
    assert p.traffic_training_step == int(gathers + 2 * p.r_params * 2 * (w - 1) / w)
    assert p.traffic_estimation_step == int(gathers + 4 * p.model.target_params)


def saved_activation_bytes(attention: str, phase: str, r: int, batch: int, seq: int) -> int:
    """What autograd keeps for backward in a bf16 tiny Llama with a frozen base (unique storages), plus
    the logits output and one fp32 gradient of the logits (the plan counts both)."""
    torch.manual_seed(0)
    model = tiny_llama(torch.bfloat16)
    model.config._attn_implementation = attention
    layers = wrap_targets(model, LLAMA_TARGETS, r)
    for layer in layers.values():
        if phase == "estimation":
            layer.probe = lambda y, x, _layer: _WeightGradTap.apply(y, x, lambda g, x: None)
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and t.is_floating_point():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, tiny_llama_config().vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    return sum(seen.values()) + out.logits.nbytes + 4 * out.logits.numel()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("phase", ["training", "estimation"])
def test_activation_formula_matches_what_autograd_saves(attention, phase):
    r, batch, seq = 8, 2, 64
    measured = saved_activation_bytes(attention, phase, r, batch, seq)
    shape = describe_model(tiny_llama_config(), LLAMA_TARGETS, r)
    predicted = activation_bytes(shape, batch, seq, 2, checkpointing=False, flash=attention != "eager",
                                 adapter_r=r if phase == "training" else 0, taps=phase == "estimation")
    assert near(predicted, measured, 0.02), (predicted, measured)


def test_checkpointing_keeps_layer_inputs_and_one_layer(plan70):
    m, tokens = plan70.model, 2048
    assert plan70.activations_checkpointed < plan70.activations_full / 5
    # The 80 layer inputs in bf16 are the bulk of what checkpointing keeps (besides the logits).
    assert plan70.activations_checkpointed > m.layers * tokens * m.hidden * 2
    # Activations grow linearly with the micro-batch under flash attention.
    assert replan(plan70, micro_batch=2).activations_full == 2 * plan70.activations_full


# ----------------------------------------------------------------------------------- check_fit


def test_a_plan_that_fits_needs_no_knob(plan70):
    assert check_fit(plan70, 80) == []


def test_a_plan_that_does_not_fit_names_the_knobs_largest_first(plan70):
    tight = replan(plan70, world_size=8, micro_batch=4, gradient_checkpointing=False)
    knobs = check_fit(tight, 40)
    text = "\n".join(knobs)
    for knob in ("model.gradient_checkpointing", "zero3_offload.json (offload_param", "use more ranks"):
        assert knob in text, text
    saved = [float(k.split("[saves ")[1].split(" GB")[0].replace(",", "")) for k in knobs]
    assert saved == sorted(saved, reverse=True)
    assert knobs[0].startswith("enable model.gradient_checkpointing")


def test_estimation_passes_split_the_accumulators_and_fit(plan70):
    one = replan(plan70, world_size=8, est_micro_batch=3)  # as the command line plans it
    assert one.est_passes == 1 and check_fit(one, 80)  # 34 GB of accumulators per rank: over 72 GB
    knob = next(k for k in check_fit(one, 80) if k.startswith("set lorasb.est_max_accum_gb"))
    assert "(2 estimation passes)" in knob and "enough alone" in knob
    two = fewest_passes(one, 80)
    assert two.est_passes == 2 and check_fit(two, 80) == []
    assert two.owner_accumulator_max <= two.settings.est_max_accum_bytes
    assert 0.45 < two.owner_accumulator_max / one.owner_accumulator_max < 0.6  # about half per pass
    # The smallest budget with two passes: 0.1 GB less makes a third pass.
    assert replan(one, est_max_accum_bytes=two.settings.est_max_accum_bytes - 10**8).est_passes > 2
    assert two.training_peak == one.training_peak  # passes change the estimation only
    assert fewest_passes(one, 20) is None  # the W0 shard alone does not fit: no budget helps


def test_micro_batch_knob_when_training_activations_dominate(plan70):
    big = replan(plan70, micro_batch=8, est_micro_batch=1, gradient_checkpointing=False)
    knobs = check_fit(big, 80)
    assert any(k.startswith("lower train_micro_batch_size_per_gpu") for k in knobs), knobs
    enough = [k for k in knobs if "enough alone" in k]
    assert enough  # checkpointing alone brings it under 80 GB
    assert check_fit(replan(big, gradient_checkpointing=True), 80) == []


def test_offload_moves_the_w0_shard_to_host(plan70):
    off = replan(plan70, offload_param=True)
    assert off.host_memory == plan70.w0_shard and plan70.host_memory == 0
    assert plan70.training_peak - off.training_peak == plan70.w0_shard


# ----------------------------------------------------------------------------------- CLI


def test_cli_70b_on_64_ranks_fits_in_80_gb():
    proc = subprocess.run(
        [sys.executable, "-m", "lorasb_ds.cli", "plan", "--model_config", "configs/models/llama-3.1-70b.json",
         "--r", "96", "--world_size", "64", "--device_memory_gb", "80"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stdout
    out = proc.stdout
    w0 = next(line for line in out.splitlines() if "W0 shard" in line)
    acc = next(line for line in out.splitlines() if "owner accumulators" in line)
    assert "2.20" in w0 and "4.29" in acc
    assert "DeepSpeed" in out and "fits" in out
    # whatever DeepSpeed logs comes before the plan or after it, never inside it (stderr merged here)
    lines = out.splitlines()
    plan = lines[next(i for i, x in enumerate(lines) if x.startswith("LoRA-SB plan")):
                 next(i for i, x in enumerate(lines) if x.startswith("fits"))]
    assert not any("[WARNING]" in line or "[INFO]" in line for line in plan)


def test_cli_70b_on_8_ranks_does_not_fit_in_40_gb(capsys):
    rc = cli_main(["plan", "--model_config", L70B, "--r", "96", "--world_size", "8", "--device_memory_gb", "40"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "does NOT fit" in out and "use more ranks" in out


def test_cli_70b_on_one_node_of_8_fits_in_80_gb_with_two_estimation_passes(capsys):
    """One pass holds 34 GB of accumulators per rank and does not fit; two passes of about half do."""
    args = ["plan", "--model_config", L70B, "--r", "96", "--world_size", "8", "--device_memory_gb", "80"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    fit = next(line for line in out.splitlines() if line.startswith("fits"))
    assert "within 72.00 GB (80 GB less 10% headroom)" in fit  # the threshold itself, not only the rule
    assert "the estimation in 2 passes: set lorasb.est_max_accum_gb=" in fit
    # the all-reduce comparison is memory: it stands in the estimation's rows, not under traffic
    assert out.index("all-reduce to every rank") < out.index("peak per rank") < out.index("traffic per rank")
    budget = float(fit.rsplit("=", 1)[1])
    acc = next(line for line in out.splitlines() if "owner accumulators" in line)
    assert f"2 passes within {budget:.2f} GB" in acc and float(acc.split()[5]) <= budget
    # The printed budget, given back, plans the same two passes and fits without a knob.
    assert cli_main(args + ["--est_max_accum_gb", str(budget)]) == 0
    assert f"2 passes within {budget:.2f} GB" in capsys.readouterr().out


def test_cli_errors_exit_2(capsys, tmp_path):
    assert cli_main(["plan", "--model_config", str(tmp_path / "none.json"), "--r", "8", "--world_size", "2"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["plan", "--model_config", L70B, "--r", "96", "--world_size", "8", "--targets", "qkv"]) == 2
    assert "match no module" in capsys.readouterr().err
    assert cli_main(["plan", "--model_config", L70B, "--r", "2000", "--world_size", "8"]) == 2
    assert "lower lorasb.r to at most 1024, or drop the targets narrower than 2000 (k_proj, v_proj)" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------------- DeepSpeed's estimator


def test_deepspeed_estimate_counts_frozen_weights_as_trained(plan70):
    est = deepspeed_estimate(plan70)
    m = plan70.model
    assert est.gpu_per_rank == int(4 * m.largest_module_params + int(18 * m.total_params / 64))
    assert est.gpu_per_rank > plan70.model_states
    assert est.gpu_per_rank > plan70.training_peak
    assert "18 bytes/param" in est.explanation


def test_format_plan_lists_every_figure(plan70):
    text = format_plan(plan70)
    for label in ("W0 shard", "W0 gathered", "B and A", "R + fp32", "owner accumulators", "in flight",
                  "without checkpointing", "with checkpointing", "estimation", "training", "traffic",
                  "all-reduce to every rank"):
        assert label in text, label
