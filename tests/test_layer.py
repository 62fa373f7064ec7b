"""LoRASBLinear: forward, gradient of R, trainable state, merge/unmerge and dropout placement."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorasb_ds.layer import LoRASBLinear, merge, unmerge

OUT, IN, R = 6, 5, 3
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def make_layer(dtype=torch.float64, bias=True, dropout=0.0, seed=0) -> LoRASBLinear:
    """A layer with random W0, b, B, A and R (B, A not orthonormal: the identities below hold for any)."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=gen, dtype=dtype))
        if bias:
            base.bias.copy_(torch.randn(OUT, generator=gen, dtype=dtype))
    layer = LoRASBLinear(base, R, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT, R, generator=gen, dtype=dtype))
        layer.lora_A.copy_(torch.randn(R, IN, generator=gen, dtype=dtype))
        layer.lora_R.copy_(torch.randn(R, R, generator=gen, dtype=dtype))
    return layer


def inputs(dtype, seed=1, shape=(2, 4, IN)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_base_plus_BRA(dtype, bias):
    layer = make_layer(dtype, bias=bias)
    x = inputs(dtype)
    W0, b = layer.base.weight, layer.base.bias
    expected = x @ W0.T + x @ (layer.lora_B @ layer.lora_R @ layer.lora_A).T
    if bias:
        expected = expected + b
    y = layer(x)
    assert y.shape == (2, 4, OUT) and y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOL[dtype])


def test_forward_differs_from_base_when_R_nonzero():
    """Guards the test above against an adapter path that silently contributes nothing."""
    layer = make_layer()
    x = inputs(torch.float64)
    assert not torch.allclose(layer(x), layer.base(x))


def test_gradient_of_R_is_projected_weight_gradient():
    """dL/dR = B^T (dL/dW) A^T, with dL/dW the gradient w.r.t. the merged weight W = W0 + B R A."""
    dtype = torch.float64
    layer = make_layer(dtype)
    x = inputs(dtype, seed=2)
    target = inputs(dtype, seed=3, shape=(2, 4, OUT))

    (layer(x) * target).sum().backward()
    grad_R = layer.lora_R.grad

    W = (layer.base.weight + layer.lora_B @ layer.lora_R @ layer.lora_A).detach().requires_grad_(True)
    (F.linear(x, W, layer.base.bias.detach()) * target).sum().backward()
    expected = layer.lora_B.T @ W.grad @ layer.lora_A.T

    assert grad_R.shape == (R, R)
    torch.testing.assert_close(grad_R, expected, rtol=1e-12, atol=1e-12)


def test_only_R_is_trainable_and_B_A_are_non_persistent_buffers():
    base = nn.Linear(IN, OUT)
    base.requires_grad_(False)  # as wrap_targets leaves the base model
    layer = LoRASBLinear(base, R)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_R"]
    assert {n for n, _ in layer.named_parameters()} == {"lora_R", "base.weight", "base.bias"}
    assert {n for n, _ in layer.named_buffers()} == {"lora_B", "lora_A"}
    assert not layer.lora_B.requires_grad and not layer.lora_A.requires_grad
    assert set(layer.state_dict()) == {"lora_R", "base.weight", "base.bias"}
    assert layer.lora_B.shape == (OUT, R) and layer.lora_A.shape == (R, IN) and layer.lora_R.shape == (R, R)


def test_new_layer_starts_as_the_base():
    """B, A and R start at zero: a freshly wrapped layer computes exactly what the base did."""
    layer = LoRASBLinear(nn.Linear(IN, OUT), R)
    x = inputs(torch.float32)
    assert torch.equal(layer(x), layer.base(x))


def test_merge_then_base_forward_equals_adapter_forward_fp32():
    layer = make_layer(torch.float32)
    x = inputs(torch.float32)
    with torch.no_grad():
        expected = layer(x)
        merge(layer)
        merged = layer.base(x)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_W0_fp32():
    layer = make_layer(torch.float32)
    W0 = layer.base.weight.detach().clone()
    merge(layer)
    assert not torch.allclose(layer.base.weight, W0)
    unmerge(layer)
    torch.testing.assert_close(layer.base.weight, W0, rtol=1e-5, atol=1e-6)


def test_merge_with_explicit_R():
    """merge(layer, R) adds B R A for the given R, not the module's own."""
    layer = make_layer(torch.float32)
    W0 = layer.base.weight.detach().clone()
    other = 2 * torch.eye(R)
    merge(layer, other)
    torch.testing.assert_close(layer.base.weight, W0 + 2 * layer.lora_B @ layer.lora_A, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_keeps_fp64_precision():
    layer = make_layer(torch.float64)
    x = inputs(torch.float64)
    W0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        merge(layer)
        torch.testing.assert_close(layer.base(x), expected, rtol=1e-12, atol=1e-12)
        unmerge(layer)
    torch.testing.assert_close(layer.base.weight, W0, rtol=1e-12, atol=1e-12)


def test_dropout_is_inactive_in_eval():
    layer = make_layer(torch.float64, dropout=0.5)
    plain = make_layer(torch.float64, dropout=0.0)
    layer.eval()
    x = inputs(torch.float64)
    assert torch.equal(layer(x), plain(x))


def test_dropout_in_train_leaves_base_path_untouched():
    """With R = 0 the adapter adds exactly zero, so the train-mode output is the base output bit for bit."""
    layer = make_layer(torch.float64, dropout=0.5)
    with torch.no_grad():
        layer.lora_R.zero_()
    layer.train()
    x = inputs(torch.float64)
    assert torch.equal(layer(x), layer.base(x))


def test_dropout_in_train_applies_to_adapter_input():
    """Same seed, same mask: y = W0 x + b + B R A dropout(x), and it differs from the no-dropout output."""
    layer = make_layer(torch.float64, dropout=0.5)
    layer.train()
    x = inputs(torch.float64, shape=(4, 8, IN))
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, p=0.5, training=True)
    BRA = layer.lora_B @ layer.lora_R @ layer.lora_A
    torch.testing.assert_close(y, layer.base(x) + xd @ BRA.T, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, layer.base(x) + x @ BRA.T)


def test_fused_projections_equal_the_unfused_layers_fp32():
    """q, k, v on one input: with the fused A-projection, outputs and the gradients of R and x equal the
    unfused layers' within 1e-6 (fp32)."""
    from lorasb_ds.layer import share_inputs

    gen = torch.Generator().manual_seed(0)
    bases = [nn.Linear(128, out) for out in (128, 64, 64)]
    factors = [(torch.randn(b.out_features, 16, generator=gen) / 4, torch.randn(16, 128, generator=gen) / 128 ** 0.5,
                torch.randn(16, 16, generator=gen) * 0.1) for b in bases]
    x0 = torch.randn(2, 24, 128, generator=gen)
    results = []
    for fuse in (False, True):
        layers = {f"attn.{n}": LoRASBLinear(b, 16) for n, b in zip(("q_proj", "k_proj", "v_proj"), bases)}
        with torch.no_grad():
            for layer, (B, A, R) in zip(layers.values(), factors):
                layer.lora_B.copy_(B), layer.lora_A.copy_(A), layer.lora_R.copy_(R)
        if fuse:
            assert share_inputs(layers) == 1
        x = x0.clone().requires_grad_(True)
        outs = [layer(x) for layer in layers.values()]
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3)) / 24 for o in outs]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        results.append((outs, [l.lora_R.grad for l in layers.values()], x.grad))
    (outs0, grads0, dx0), (outs1, grads1, dx1) = results
    for a, b in zip(outs0 + grads0 + [dx0], outs1 + grads1 + [dx1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_projections_equal_the_unfused_model(checkpointing):
    """The tiny Llama with fused q/k/v and gate/up projections: the same logits and R gradients as
    without, in fp64 (where rounding cannot hide a difference), with and without checkpointing."""
    from lorasb_ds.config import LLAMA_TARGETS
    from lorasb_ds.modeling import tiny_llama
    from lorasb_ds.surgery import wrap_targets

    gen = torch.Generator().manual_seed(0)
    runs = []
    for fuse in (False, True):
        model = tiny_llama(torch.float64)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = wrap_targets(model, LLAMA_TARGETS, r=8, fuse=fuse)
        assert sum(layer.shared is not None for layer in layers.values()) == (5 * 4 if fuse else 0)
        gen.manual_seed(1)
        with torch.no_grad():
            for layer in layers.values():
                # unit-scale columns and rows, as the SVD's B and A; R of the size a run reaches
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) / layer.r ** 0.5)
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / layer.in_features ** 0.5)
                layer.lora_R.copy_(torch.randn(layer.lora_R.shape, generator=gen) * 0.1)
        model.train()
        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(2))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        runs.append((out.logits.detach(), {n: l.lora_R.grad.clone() for n, l in layers.items()}))
    (logits0, grads0), (logits1, grads1) = runs
    torch.testing.assert_close(logits1, logits0, rtol=0, atol=1e-10)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-10, atol=1e-10)
