"""The baselines trained by the same pipeline (``lorasb.method``): LoRA-XS, LoRA and full fine-tuning.

One 2-rank ZeRO-3 run per method (every parameter partitioned); then, in this process, their inits are
checked against what the method defines, and their adapters are applied, exported and merged.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun
from lorasb_ds.config import LLAMA_TARGETS, ConfigError
from lorasb_ds.export import apply_adapter, export_peft, merge_checkpoint
from lorasb_ds.files import ADAPTER_FILE_NAME, INIT_FILE_NAME, load_adapter
from lorasb_ds.modeling import tiny_llama

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(__file__), "workers", "methods_worker.py")
R = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    torchrun(2, WORKER, str(out), "loraxs", "lora", "full")
    return out


def tensors(run_dir, name):
    return load_file(os.path.join(run_dir, "adapter", name))


def summary(run_dir):
    return json.load(open(os.path.join(run_dir, "run_summary.json")))


def steps(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"step"' in line]


def target_linears():
    model = tiny_llama()
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS}


@torch.no_grad()
def logits(model, seed=3):
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(seed))
    return model.eval()(input_ids=ids).logits.float()


def test_loraxs_starts_from_the_svd_of_the_weights_and_trains_R(runs):
    run_dir = runs / "loraxs"
    init = tensors(run_dir, INIT_FILE_NAME)
    linears = target_linears()
    assert len(linears) == 28
    for name, linear in linears.items():
        W0 = linear.weight.detach().float()
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        best = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
        B, A, R0 = (init[f"{name}.lora_{m}"] for m in "BAR")
        torch.testing.assert_close(B @ A, best, atol=1e-4, rtol=0)  # B = U_r, A = S_r V_r^T
        torch.testing.assert_close(B.T @ B, torch.eye(R), atol=1e-5, rtol=0)
        assert 0 < R0.abs().max() < 1e-4  # R ~ N(0, 1e-5^2)
    trained = tensors(run_dir, ADAPTER_FILE_NAME)
    assert set(trained) == {f"{n}.lora_R" for n in linears}
    assert any((trained[k] - init[k]).abs().max() > 1e-4 for k in trained)  # R moved
    assert summary(run_dir)["trainable_parameters"] == 28 * R * R
    assert [s["step"] for s in steps(run_dir)] == [1, 2, 3]


def test_lora_starts_at_the_base_model_and_trains_B_and_A(runs):
    run_dir = runs / "lora"
    init = tensors(run_dir, INIT_FILE_NAME)
    linears = target_linears()
    for name, linear in linears.items():
        B, A, R0 = (init[f"{name}.lora_{m}"] for m in "BAR")
        assert not B.any()  # B = 0: the adapter adds nothing at step 0
        assert A.abs().max() <= 1 / linear.in_features ** 0.5 and A.std() > 0
        torch.testing.assert_close(R0, 2.0 * torch.eye(R))  # lora_alpha = 2 r by default: scaling 2
    trained = tensors(run_dir, ADAPTER_FILE_NAME)
    assert set(trained) == {f"{n}.lora_{m}" for n in linears for m in "AB"}
    assert all(trained[f"{n}.lora_B"].any() for n in linears)
    expected = sum((m.in_features + m.out_features) * R for m in linears.values())
    assert summary(run_dir)["trainable_parameters"] == expected


def test_lora_resumes_bitwise(runs):
    first = load_file(os.path.join(runs, "lora_first_adapter.safetensors"))
    resumed = tensors(runs / "lora", ADAPTER_FILE_NAME)
    assert set(first) == set(resumed)
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    inits = [json.loads(line) for line in open(runs / "lora" / "metrics.jsonl") if '"event"' in line]
    assert inits[-1]["resumed_from"].endswith("step00000002") and inits[-1]["start_step"] == 2


def test_lora_exports_to_peft_with_the_same_logits(runs, tmp_path):
    from peft import PeftModel

    adapter_dir = str(runs / "lora" / "adapter")
    ours = tiny_llama()
    apply_adapter(ours, adapter_dir)
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    export_peft(adapter_dir, str(tmp_path / "peft"), str(base_dir))
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "peft"))
    assert (logits(peft_model) - logits(ours)).abs().max() <= 1e-4
    assert (logits(ours) - logits(tiny_llama())).abs().max() > 1e-3  # the adapter does something


def test_full_fine_tuning_trains_every_weight_and_merges(runs, tmp_path):
    run_dir = runs / "full"
    trained = tensors(run_dir, ADAPTER_FILE_NAME)
    base = tiny_llama()
    params = dict(base.named_parameters())
    assert set(trained) == set(params)
    moved = [k for k, t in trained.items() if (t - params[k].detach()).abs().max() > 0]
    assert len(moved) == len(params)
    assert summary(run_dir)["trainable_parameters"] == sum(p.numel() for p in params.values())
    adapter, weights, meta = load_adapter(str(run_dir / "adapter"))
    assert adapter == {} and meta["method"] == "full" and set(weights) == set(params)

    ours = tiny_llama()
    apply_adapter(ours, str(run_dir / "adapter"))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, max_shard_size="200KB")
    merge_checkpoint(str(base_dir), str(run_dir / "adapter"), str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (logits(merged) - logits(ours)).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="method 'full' .*no LoRA form"):
        export_peft(str(run_dir / "adapter"), str(tmp_path / "peft"))
