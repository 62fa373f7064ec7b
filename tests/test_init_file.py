"""From gradient to B, A, R (init.py), the init file round trip, and the owner assignment of modules."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lorasb_ds.config import LLAMA_TARGETS, ConfigError, LoraSBConfig
from lorasb_ds.estimate import assign_owners, estimation_groups
from lorasb_ds.files import (INIT_FORMAT, LayerInit, check_init_metadata, load_init_file, read_init_metadata,
                             save_init_file)
from lorasb_ds.init import init_from_gradient, truncated_svd, update_from_gradient
from lorasb_ds.modeling import tiny_llama
from lorasb_ds.surgery import wrap_targets


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def best_rank_r(M: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of M, from an SVD in fp64 (an fp32 SVD is itself off by ~1e-5)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]).to(M.dtype)


def projector(Q: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the span of the (orthonormal) columns of Q."""
    return Q @ Q.T


# --------------------------------------------------------------------------- update approximation


def test_update_sign():
    G = torch.tensor([[2.0, -0.5, 0.0], [-3.0, 1e-9, 7.0]])
    dW = update_from_gradient(G, "sign", 0.1)
    torch.testing.assert_close(dW, torch.tensor([[-0.1, 0.1, 0.0], [0.1, -0.1, -0.1]]))


def test_update_sgd():
    G = randn(5, 4)
    torch.testing.assert_close(update_from_gradient(G, "sgd", 0.25), -0.25 * G)


# --------------------------------------------------------------------------- truncated SVD


@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
def test_exact_svd_is_best_rank_r_approximation(shape):
    dW = randn(*shape, dtype=torch.float64)
    U, S, V, _ = truncated_svd(dW, 3, LoraSBConfig(r=3, svd="exact", svd_oversample=0), seed=0)
    assert U.shape == (shape[0], 3) and S.shape == (3,) and V.shape == (shape[1], 3)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, best_rank_r(dW, 3), rtol=1e-10, atol=1e-10)


def low_rank_plus_noise(out=60, inn=40, rank=4, noise=1e-4, seed=0):
    """Singular values 10, 8, 6, 4 then noise: a clear spectral gap after ``rank``."""
    U, _ = torch.linalg.qr(randn(out, rank, seed=seed))
    V, _ = torch.linalg.qr(randn(inn, rank, seed=seed + 1))
    S = torch.tensor([10.0, 8.0, 6.0, 4.0])[:rank]
    return U @ torch.diag(S) @ V.T + noise * randn(out, inn, seed=seed + 2), U, V


@pytest.mark.parametrize("svd", ["randomized", "converged"])
def test_iterative_svd_recovers_subspaces(svd):
    dW, U_true, V_true = low_rank_plus_noise()
    U, S, V, _ = truncated_svd(dW, 4, LoraSBConfig(r=4, svd=svd, svd_oversample=4, svd_niter=4), seed=0)
    torch.testing.assert_close(projector(U), projector(U_true), atol=1e-3, rtol=0)
    torch.testing.assert_close(projector(V), projector(V_true), atol=1e-3, rtol=0)
    torch.testing.assert_close(S, torch.tensor([10.0, 8.0, 6.0, 4.0]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("svd", ["randomized", "converged"])
def test_iterative_svd_is_seeded_and_leaves_global_rng_alone(svd):
    dW = randn(200, 100)  # no gap: the sketch matters, so seeds show up in the result
    cfg = LoraSBConfig(r=3, svd=svd, svd_oversample=2, svd_niter=0, svd_max_iter=1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = truncated_svd(dW, 3, cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    again = truncated_svd(dW, 3, cfg, seed=5)
    other = truncated_svd(dW, 3, cfg, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first[:3], again[:3]))
    assert not torch.equal(first.U, other.U)


def random_signs(out: int, inn: int, seed: int = 0) -> torch.Tensor:
    """sign(G) of a gradient without structure: a nearly flat spectrum, the hard case for a sketch."""
    return torch.sign(randn(out, inn, seed=seed))


@pytest.mark.parametrize("shape", [(1024, 1024), (1536, 1024), (1024, 1536)])
def test_converged_svd_captures_the_exact_energy_of_random_signs(shape):
    """At r = 96 the default SVD keeps >= 99.5% of the exact rank-r energy, with orthonormal factors."""
    dW, cfg = random_signs(*shape), LoraSBConfig(r=96)
    assert cfg.svd == "converged"
    U, S, V, iterations = truncated_svd(dW, 96, cfg, seed=0)
    exact = float(torch.linalg.svdvals(dW)[:96].square().sum())
    captured = float((U.T @ dW @ V).square().sum())
    assert captured >= 0.995 * exact, captured / exact
    torch.testing.assert_close(float(S.square().sum()), captured, rtol=1e-4, atol=0)
    assert 1 < iterations < cfg.svd_max_iter  # it grew and it stopped by itself
    torch.testing.assert_close(U.T @ U, torch.eye(96), atol=1e-4, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(96), atol=1e-4, rtol=0)


def test_converged_svd_with_a_gap_stops_early_and_narrow_matrices_are_exact():
    dW, _, _ = low_rank_plus_noise(out=400, inn=300)
    assert truncated_svd(dW, 4, LoraSBConfig(r=4, svd_oversample=4), seed=0).iterations <= 3
    narrow = randn(150, 300)  # 150 <= 8 blocks of r + oversample: the exact subspace is the cheap one
    for M in (narrow, narrow.T):  # from the Gram matrix of the shorter side, either way round
        U, S, V, iterations = truncated_svd(M, 8, LoraSBConfig(r=8), seed=0)
        assert iterations == 0
        torch.testing.assert_close(U @ torch.diag(S) @ V.T, best_rank_r(M, 8), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(U.T @ U, torch.eye(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(V.T @ V, torch.eye(8), atol=1e-5, rtol=0)


def test_converged_svd_of_a_rank_deficient_matrix_is_orthonormal():
    """A zero gradient or a rank below the block: factors stay orthonormal, the product exact."""
    for dW in (torch.zeros(300, 200), low_rank_plus_noise(out=300, inn=200, noise=0.0)[0]):
        U, S, V, _ = truncated_svd(dW, 8, LoraSBConfig(r=8), seed=0)
        torch.testing.assert_close(U.T @ U, torch.eye(8), atol=1e-4, rtol=0)
        torch.testing.assert_close(U @ torch.diag(S) @ V.T, dW, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- init_from_gradient


@pytest.mark.parametrize("update", ["sign", "sgd"])
@pytest.mark.parametrize("svd", ["exact", "randomized", "converged"])
def test_init_from_gradient_factors(update, svd):
    r = 4
    G = randn(24, 16, seed=3)
    cfg = LoraSBConfig(r=r, update=update, svd=svd, svd_oversample=8, svd_niter=6)
    init = init_from_gradient(G, cfg, lr_eff=0.1, seed=0)
    assert init.B.shape == (24, r) and init.A.shape == (r, 16) and init.R.shape == (r, r)
    assert init.B.dtype == init.A.dtype == init.R.dtype == torch.float32
    torch.testing.assert_close(init.B.T @ init.B, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(init.A @ init.A.T, torch.eye(r), atol=1e-5, rtol=0)
    d = torch.diagonal(init.R)
    assert torch.equal(init.R, torch.diag(d))
    assert (d >= 0).all() and (d[:-1] >= d[1:]).all() and d[0] > 0
    assert 0 < init.energy <= 1


def test_init_from_gradient_exact_energy_and_product():
    """B R A is the best rank-r approximation of dW = -lr G, energy = sum(S_r^2) / ||dW||_F^2."""
    r, lr = 3, 0.05
    G = randn(20, 14, seed=4)
    init = init_from_gradient(G, LoraSBConfig(r=r, update="sgd", svd="exact"), lr_eff=lr, seed=0)
    dW = -lr * G
    S = torch.linalg.svdvals(dW)
    assert init.energy == pytest.approx(float((S[:r] ** 2).sum() / (dW ** 2).sum()), rel=1e-6)
    assert init.energy < 1  # G has full rank 14 > r
    torch.testing.assert_close(torch.diagonal(init.R), S[:r], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(init.B @ init.R @ init.A, best_rank_r(dW, r), rtol=1e-4, atol=1e-6)


def test_init_from_gradient_full_rank_captures_all_energy():
    G = randn(10, 6, seed=5)
    init = init_from_gradient(G, LoraSBConfig(r=6, update="sign", svd="exact"), lr_eff=1.0, seed=0)
    assert init.energy == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(init.B @ init.R @ init.A, -torch.sign(G), atol=1e-5, rtol=0)


def test_init_from_gradient_zero_gradient_has_zero_energy():
    init = init_from_gradient(torch.zeros(8, 6), LoraSBConfig(r=2, svd="exact"), lr_eff=0.1, seed=0)
    assert init.energy == 0.0
    assert torch.equal(init.R, torch.zeros(2, 2))


# --------------------------------------------------------------------------- init file


R_RANK = 2


@pytest.fixture(scope="module")
def wrapped():
    return wrap_targets(tiny_llama(), LLAMA_TARGETS, r=R_RANK)


def random_inits(layers, seed=0) -> dict[str, LayerInit]:
    inits = {}
    for i, (name, layer) in enumerate(layers.items()):
        s = seed + 10 * i
        inits[name] = LayerInit(B=randn(layer.out_features, layer.r, seed=s),
                                A=randn(layer.r, layer.in_features, seed=s + 1),
                                R=randn(layer.r, layer.r, seed=s + 2), energy=0.5 + i / 1000,
                                svd_iterations=i % 5)
    return inits


def meta_for(r=R_RANK, targets=LLAMA_TARGETS):
    return {"model": "builtin:tiny-llama", "target_modules": list(targets), "r": r}


def test_init_file_round_trip(tmp_path, wrapped):
    inits = random_inits(wrapped)
    path = str(tmp_path / "new_dir" / "init.safetensors")  # the directory is created
    save_init_file(path, inits, dict(meta_for(), init_id="abc"))
    loaded, meta = load_init_file(path, wrapped)
    assert list(loaded) == list(wrapped)
    for name, init in inits.items():
        got = loaded[name]
        for a, b in ((got.B, init.B), (got.A, init.A), (got.R, init.R)):
            assert a.shape == b.shape and a.dtype == torch.float32 and torch.equal(a, b)
        assert (got.energy, got.svd_iterations) == (init.energy, init.svd_iterations)
    assert meta["format"] == INIT_FORMAT and meta["init_id"] == "abc" and meta["r"] == R_RANK
    assert meta["target_modules"] == LLAMA_TARGETS
    assert meta["energy"] == {n: i.energy for n, i in inits.items()}
    assert meta["svd_iterations"] == {n: i.svd_iterations for n, i in inits.items()}
    assert read_init_metadata(path) == meta


def test_init_file_written_atomically(tmp_path, wrapped):
    path = tmp_path / "init.safetensors"
    save_init_file(str(path), random_inits(wrapped, seed=0), meta_for())
    save_init_file(str(path), random_inits(wrapped, seed=1), meta_for())  # replaces the first
    assert os.listdir(tmp_path) == ["init.safetensors"]
    loaded, _ = load_init_file(str(path), wrapped)
    first = next(iter(wrapped))
    assert torch.equal(loaded[first].B, random_inits(wrapped, seed=1)[first].B)


def test_read_metadata_of_foreign_safetensors_file(tmp_path):
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(ConfigError, match="not a LoRA-SB init file"):
        read_init_metadata(plain)
    other = str(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(2)}, other, metadata={"lorasb": json.dumps({"format": "lorasb-init-v0"})})
    with pytest.raises(ConfigError, match="lorasb-init-v0"):
        read_init_metadata(other)


def test_load_against_other_targets(tmp_path, wrapped):
    path = str(tmp_path / "init.safetensors")
    save_init_file(path, random_inits(wrapped), meta_for())
    fewer = wrap_targets(tiny_llama(), ["q_proj", "v_proj"], r=R_RANK)
    with pytest.raises(ConfigError, match="does not match this model's targets"):
        load_init_file(path, fewer)


def test_load_against_other_rank(tmp_path, wrapped):
    path = str(tmp_path / "init.safetensors")
    save_init_file(path, random_inits(wrapped), meta_for())
    other_r = wrap_targets(tiny_llama(), LLAMA_TARGETS, r=R_RANK + 1)
    with pytest.raises(ConfigError, match=r"shapes of 'model\.layers\.0\.self_attn\.q_proj' differ"):
        load_init_file(path, other_r)


def test_check_init_metadata():
    meta = dict(meta_for(), format=INIT_FORMAT, energy={})
    check_init_metadata("f", meta, meta_for())
    with pytest.raises(ConfigError, match=r"made for r = 2, this run has 4"):
        check_init_metadata("f", meta, meta_for(r=4))
    with pytest.raises(ConfigError, match="target_modules"):
        check_init_metadata("f", meta, meta_for(targets=["q_proj"]))
    with pytest.raises(ConfigError, match="model"):
        check_init_metadata("f", meta, dict(meta_for(), model="other/model"))


# --------------------------------------------------------------------------- owners


SHAPES = {f"m{i}": s for i, s in enumerate(
    [(128, 128), (64, 128), (64, 128), (128, 128), (256, 128), (256, 128), (128, 256),
     (10, 10), (300, 7), (1, 1), (64, 128), (256, 512)])}


def loads_of(owners, shapes, world):
    load = [0] * world
    for name, rank in owners.items():
        load[rank] += shapes[name][0] * shapes[name][1]
    return load


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_owners_cover_every_module_once_and_are_balanced(world):
    owners = assign_owners(SHAPES, world)
    assert list(owners) == list(SHAPES)  # one owner per module, in the given order
    assert all(0 <= rank < world for rank in owners.values())
    load = loads_of(owners, SHAPES, world)
    assert max(load) <= min(load) + max(o * i for o, i in SHAPES.values())


def test_owners_deterministic():
    assert assign_owners(SHAPES, 3) == assign_owners(dict(SHAPES), 3)
    # with distinct sizes the owners do not depend on the order the modules are listed in
    distinct = {f"d{i}": (i + 1, 3) for i in range(9)}
    reversed_order = dict(reversed(list(distinct.items())))
    assert assign_owners(reversed_order, 4) == assign_owners(distinct, 4)


def test_owners_world_size_one():
    assert set(assign_owners(SHAPES, 1).values()) == {0}


def test_owners_more_ranks_than_modules():
    shapes = {"a": (4, 4), "b": (8, 8), "c": (2, 2)}
    owners = assign_owners(shapes, 5)
    assert owners == {"a": 1, "b": 0, "c": 2}  # largest first, each to the next empty rank


def test_owners_largest_first_to_least_loaded():
    shapes = {"small": (1, 1), "big": (10, 10), "mid": (5, 5), "mid2": (5, 5)}
    # big -> 0, mid -> 1, mid2 -> 1 (25 < 100), small -> 1 (50 < 100)
    assert assign_owners(shapes, 2) == {"small": 1, "big": 0, "mid": 1, "mid2": 1}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("budget", [None, 1.0, 1.5, 100.0])  # in largest modules
def test_estimation_groups_are_consecutive_and_fit_the_budget_on_every_rank(world, budget):
    owners = assign_owners(SHAPES, world)
    max_bytes = None if budget is None else int(4 * budget * max(o * i for o, i in SHAPES.values()))
    groups = estimation_groups(SHAPES, owners, max_bytes)
    assert [name for group in groups for name in group] == list(SHAPES)  # every module once, in order
    assert all(groups)
    for group in groups:
        per_rank = loads_of({n: owners[n] for n in group}, SHAPES, world)
        assert max_bytes is None or 4 * max(per_rank) <= max_bytes
    # next fit: the first module of a group would have put its owner over the budget in the group before
    for before, group in zip(groups, groups[1:]):
        first = group[0]
        load = sum(SHAPES[n][0] * SHAPES[n][1] for n in before if owners[n] == owners[first])
        assert 4 * (load + SHAPES[first][0] * SHAPES[first][1]) > max_bytes
    assert (len(groups) == 1) == (max_bytes is None or max_bytes >= 4 * max(loads_of(owners, SHAPES, world)))


def test_estimation_groups_refuse_a_budget_below_one_module():
    largest = max(o * i for o, i in SHAPES.values())
    with pytest.raises(ConfigError, match="lorasb.est_max_accum_gb = .* is below the fp32 accumulator of"):
        estimation_groups(SHAPES, assign_owners(SHAPES, 2), 4 * largest - 1)
    assert len(estimation_groups(SHAPES, assign_owners(SHAPES, 2), 4 * largest)) > 1
