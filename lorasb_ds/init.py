"""Initial B, A, R of every adapter layer: from the estimated gradient (LoRA-SB), from the weights
(LoRA-XS) or PEFT-style (LoRA); broadcast, applied, and kept in an init file.

Per module, on its owner rank only:

    dW = -lr_eff * sign(G)      (update = "sign": the first, bias-corrected Adam step)
    dW = -lr_eff * G            (update = "sgd")
    dW ~= U_r S_r V_r^T         (truncated_svd: a converged block Krylov SVD by default)
    B = U_r (out x r),  A = V_r^T (r x in),  R = diag(S_r) (r x r)

so ``B R A`` is the best rank-r approximation of dW (exactly so with ``svd = "exact"``). W0 is left
as it is. The captured energy ``sum(S_r^2) / ||dW||_F^2`` is kept as a diagnostic.

The two baselines trained by the same pipeline (``lorasb.method``):

    loraxs:  W0 ~= U_r S_r V_r^T,  B = U_r,  A = S_r V_r^T,  R ~ N(0, 1e-5^2)       (R trained)
    lora:    B = 0,  A ~ U(-1/sqrt(in), 1/sqrt(in)),  R = (alpha / r) I          (B, A trained)

Then every owner broadcasts its modules in one fixed order, so all ranks hold bitwise-identical
B, A, R. The init file (written once by rank 0; its format lives in files.py) stores them with the
run's metadata; B and A come from data and cannot be regenerated from a seed, so a run that is given
an init file never repeats the estimation.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import NamedTuple

import torch
import torch.distributed as dist

from .config import LoraSBConfig, RunConfig
from .estimate import (EstimationStats, bucket_bytes, check_finite, estimate_gradients, estimation_groups,
                       layer_shapes, max_accum_bytes)
from .files import LayerInit, save_init_file
from .layer import LoRASBLinear
from .methods import METHODS
from .modeling import builtin_name


def update_from_gradient(G: torch.Tensor, update: str, lr_eff: float) -> torch.Tensor:
    """The approximated first full fine-tuning step dW (out x in, fp32)."""
    return -lr_eff * (torch.sign(G) if update == "sign" else G)


EXACT_BELOW_BLOCKS = 8
"""``converged`` takes the exact top-r subspace when the shorter side is at most this many Krylov
blocks: the space would fill most of it anyway (flat spectra take 6-11 blocks). It comes from the
eigenvectors of the Gram matrix on the shorter side, 1.7-3.8x faster than ``torch.linalg.svd`` at
SmolLM2's and the 63M preset's shapes for the same captured energy (within 3e-7)."""


class TruncatedSVD(NamedTuple):
    U: torch.Tensor  # (out, r), orthonormal columns
    S: torch.Tensor  # (r,), descending
    V: torch.Tensor  # (in, r), orthonormal columns
    iterations: int  # Krylov blocks (converged), power iterations (randomized), 0 (exact)


def truncated_svd(M: torch.Tensor, r: int, cfg: LoraSBConfig, seed: int) -> TruncatedSVD:
    """Top-r singular triplets of M (out x in) by ``cfg.svd``; the random start is seeded.

    ``converged``: a block Krylov space grown until its captured top-r energy stops rising (where the
    matrix is narrow, the exact top-r subspace from its Gram matrix); ``randomized``:
    ``torch.svd_lowrank`` with a fixed number of power iterations (the reference code's choice);
    ``exact``: ``torch.linalg.svd``.
    """
    block = min(r + cfg.svd_oversample, *M.shape)
    if cfg.svd == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return TruncatedSVD(U[:, :r], S[:r], Vh[:r].T, 0)
    if cfg.svd == "converged" and min(M.shape) <= EXACT_BELOW_BLOCKS * block:
        if M.shape[0] > M.shape[1]:
            V, S, U = _top_r_from_gram(M.T, r)
            return TruncatedSVD(U, S, V, 0)
        return TruncatedSVD(*_top_r_from_gram(M, r), 0)
    generator = torch.Generator().manual_seed(seed)
    if cfg.svd == "randomized":
        with torch.random.fork_rng(devices=[M.device] if M.device.type == "cuda" else []):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(M, q=block, niter=cfg.svd_niter)
        return TruncatedSVD(U[:, :r], S[:r], V[:, :r], cfg.svd_niter)
    if M.shape[0] > M.shape[1]:  # grow the space on the shorter side
        U, S, V, iterations = _block_krylov(M.T, r, block, cfg.svd_tol, cfg.svd_max_iter, generator)
        return TruncatedSVD(V, S, U, iterations)
    return TruncatedSVD(*_block_krylov(M, r, block, cfg.svd_tol, cfg.svd_max_iter, generator))


def _block_krylov(M: torch.Tensor, r: int, block: int, tol: float, max_iter: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Top-r SVD of M (m x n, m <= n) from span[M X, (M M^T) M X, ...], X random (n x block).

    Q (m x k) is the orthonormal basis so far and Z = Q^T M (k x n); the top-r energy the space
    captures is the sum of the r largest eigenvalues of Z Z^T (k x k, kept up to date block by block).
    A block is added while that energy rises by more than ``tol`` (relative), up to ``max_iter``
    blocks or the whole of R^m. Per block: two products with M, like one power iteration; then one
    Rayleigh-Ritz step.
    """
    m = M.shape[0]
    Y = M @ torch.randn(M.shape[1], block, generator=generator).to(M)
    Q = M.new_empty(m, 0)
    Z = M.new_empty(0, M.shape[1])
    gram = M.new_empty(0, 0)
    previous = -1.0
    for iterations in range(1, max_iter + 1):
        Y = Y[:, : m - Q.shape[1]]
        for _ in range(2):  # twice is enough (Giraud et al.): the new block is orthogonal to Q
            Y = Y - Q @ (Q.T @ Y)
        Q_new = torch.linalg.qr(Y).Q
        Z_new = Q_new.T @ M
        cross = Z @ Z_new.T
        gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.T, Z_new @ Z_new.T], 1)], 0)
        Q, Z = torch.cat([Q, Q_new], 1), torch.cat([Z, Z_new], 0)
        energy = float(torch.linalg.eigvalsh(gram)[-r:].sum())
        if energy - previous <= tol * energy or Q.shape[1] >= m:
            break
        previous = energy
        Y = M @ Z_new.T  # (M M^T) Q_new
    # Rayleigh-Ritz: the top-r eigenvectors of Q^T M M^T Q give the best rank-r subspace within Q's span
    Q = torch.linalg.qr(Q).Q  # orthonormal even if a last block was numerically dependent
    U, S, V = _top_r_from_gram(Q.T @ M, r)
    return Q @ U, S, V, iterations


def _top_r_from_gram(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of M (m x n, m <= n): U from the top-r eigenvectors of the Gram matrix M M^T (m x m),
    then the SVD of U^T M (r x n, cheap) turns them into singular vectors and gives S and V."""
    U = torch.linalg.eigh(M @ M.T).eigenvectors[:, -r:]
    Ub, S, Vh = torch.linalg.svd(U.T @ M, full_matrices=False)
    return U @ Ub, S, Vh.T


def init_from_gradient(G: torch.Tensor, cfg: LoraSBConfig, lr_eff: float, seed: int) -> LayerInit:
    """Owner-rank work for one module: dW, its truncated SVD, and B, A, R."""
    dW = update_from_gradient(G.float(), cfg.update, lr_eff)
    U, S, V, iterations = truncated_svd(dW, cfg.r, cfg, seed)
    total = float(dW.square().sum())
    energy = float(S.square().sum()) / total if total > 0 else 0.0
    return LayerInit(B=U.contiguous(), A=V.T.contiguous(), R=torch.diag(S), energy=energy,
                     svd_iterations=iterations)


@torch.no_grad()
def init_from_weight(W0: torch.Tensor, cfg: LoraSBConfig, seed: int) -> LayerInit:
    """LoRA-XS (Balazy et al., arXiv 2405.17604): B, A from the top-r SVD of W0 itself, R near 0."""
    W0 = W0.float()
    U, S, V, iterations = truncated_svd(W0, cfg.r, cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    R = 1e-5 * torch.randn(cfg.r, cfg.r, generator=generator)
    energy = float(S.square().sum()) / max(float(W0.square().sum()), 1e-30)
    return LayerInit(B=U.contiguous().cpu(), A=(S[:, None] * V.T).contiguous().cpu(), R=R, energy=energy,
                     svd_iterations=iterations)


def lora_init(out_features: int, in_features: int, cfg: LoraSBConfig, seed: int) -> LayerInit:
    """PEFT's LoRA init: B = 0, A Kaiming-uniform (bound 1/sqrt(in)); the scaling sits in R."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    A = (torch.rand(cfg.r, in_features, generator=generator) * 2 - 1) * bound
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.r
    return LayerInit(B=torch.zeros(out_features, cfg.r), A=A, R=(alpha / cfg.r) * torch.eye(cfg.r), energy=0.0)


def broadcast_inits(layers: dict[str, LoRASBLinear], local: dict[str, LayerInit], owners: dict[str, int],
                    device: torch.device) -> dict[str, LayerInit]:
    """Every rank ends with every module's init (CPU fp32), sent by its owner. Collective.

    One broadcast per module, in the order of ``layers`` (the same on every rank).
    """
    rank = dist.get_rank()
    result: dict[str, LayerInit] = {}
    for name, layer in layers.items():
        out_f, in_f, r = layer.out_features, layer.in_features, layer.r
        sizes = [out_f * r, r * in_f, r * r, 1, 1]
        if owners[name] == rank:
            mine = local[name]
            flat = torch.cat([mine.B.flatten(), mine.A.flatten(), mine.R.flatten(),
                              torch.tensor([mine.energy, mine.svd_iterations], device=mine.B.device)]).to(device)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        dist.broadcast(flat, src=owners[name])
        B, A, R, e, iterations = flat.cpu().split(sizes)
        result[name] = LayerInit(B.view(out_f, r).clone(), A.view(r, in_f).clone(), R.view(r, r).clone(),
                                 float(e), int(iterations))
    return result


@torch.no_grad()
def apply_inits(layers: dict[str, LoRASBLinear], inits: dict[str, LayerInit]) -> None:
    """Write B, A, R into every layer on every rank. Collective under ZeRO-3.

    Buffers are copied directly. Parameters may be partitioned: each layer's are gathered, set from
    rank 0 (all ranks hold the same values) and re-partitioned, and a trained one also gets its
    optimizer fp32 copy set with ``safe_set_full_fp32_param``, or training would start from the old
    value.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    for name, layer in layers.items():
        values = {"B": inits[name].B, "A": inits[name].A, "R": inits[name].R}
        tensors = {part: getattr(layer, f"lora_{part}") for part in values}
        params = [t for t in tensors.values() if isinstance(t, torch.nn.Parameter)]
        for part, t in tensors.items():
            if not isinstance(t, torch.nn.Parameter):
                t.copy_(values[part].to(t))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            for part, t in tensors.items():
                if isinstance(t, torch.nn.Parameter):
                    t.copy_(values[part].to(t))
        for part, t in tensors.items():
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                safe_set_full_fp32_param(t, values[part].to(t.device))


def init_adapters(cfg: RunConfig, model: torch.nn.Module, layers: dict[str, LoRASBLinear], owners: dict[str, int],
                  batches: list[tuple[dict[str, torch.Tensor], float]], lr_eff: float, data_fingerprint: str | None,
                  init_path: str | None, device: torch.device
                  ) -> tuple[dict[str, LayerInit], dict, EstimationStats | None]:
    """Initial B, A, R of every layer as ``lorasb.method`` says; rank 0 writes them to ``init_path``
    (None: no file). Collective: every rank calls it with its own ``batches`` (the estimation's
    ``(batch, weight)`` micro-batches, as many on every rank; weights summing to 1 over all ranks) and
    the same other arguments, and ends with every module's init.

    Each module's owner computes its init (``lorasb``: estimation pass, then the SVD of the update;
    ``loraxs``: the SVD of W0, gathered on every rank in turn; ``lora``: seeded), then every init is
    broadcast from its owner. ``full`` has no layers: its init file holds metadata only.
    Returns the inits, the init file's metadata and the estimation's statistics (``lorasb`` only).
    """
    import deepspeed

    method, rank = METHODS[cfg.lorasb.method], dist.get_rank()
    index = {name: i for i, name in enumerate(layers)}  # a per-module seed, owner-independent
    mine = [name for name in layers if owners[name] == rank]
    stats = None
    local: dict[str, LayerInit] = {}
    init_seconds = 0.0
    if method.estimates:  # group by group: estimate G (collective), then the owners' SVDs free it
        for group in estimation_groups(layer_shapes(layers), owners, max_accum_bytes(cfg.lorasb.est_max_accum_gb)):
            grads, group_stats = estimate_gradients(model, {name: layers[name] for name in group}, batches,
                                                    owners, device, bucket_bytes(cfg.lorasb.est_bucket_mb))
            stats = group_stats if stats is None else stats.add(group_stats)
            check_finite(grads, group, device)
            t0 = time.perf_counter()
            for name in group:
                if name in mine:
                    local[name] = init_from_gradient(grads.pop(name), cfg.lorasb, lr_eff, cfg.train.seed + index[name])
            init_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, layer in layers.items():
        seed = cfg.train.seed + index[name]
        if method.init == "weight":
            with deepspeed.zero.GatheredParameters([layer.base.weight]):  # every rank, every module
                W0 = layer.base.weight.detach().float().clone() if name in mine else None
            if W0 is not None:
                local[name] = init_from_weight(W0, cfg.lorasb, seed)
        elif method.init == "seeded" and name in mine:
            local[name] = lora_init(layer.out_features, layer.in_features, cfg.lorasb, seed)
    init_seconds += time.perf_counter() - t0
    inits = broadcast_inits(layers, local, owners, device)
    meta = dict(init_metadata(cfg), init_id=new_init_id(), seed=cfg.train.seed, world_size=dist.get_world_size(),
                owners=owners, versions=library_versions())
    if method.estimates:
        meta.update(update=cfg.lorasb.update, lr_eff=lr_eff, est_samples=cfg.lorasb.est_samples,
                    est_micro_batch=cfg.lorasb.est_micro_batch, data_fingerprint=data_fingerprint,
                    estimation_seconds=round(stats.seconds, 3) if stats else None)
    if method.decomposes:
        meta.update(svd=cfg.lorasb.svd, svd_oversample=cfg.lorasb.svd_oversample, svd_niter=cfg.lorasb.svd_niter,
                    svd_tol=cfg.lorasb.svd_tol, svd_max_iter=cfg.lorasb.svd_max_iter)
    if method.alpha_scaled:
        meta.update(lora_alpha=cfg.lorasb.lora_alpha if cfg.lorasb.lora_alpha is not None else 2 * cfg.lorasb.r)
    if rank == 0 and init_path is not None:
        save_init_file(init_path, inits, meta)
    if rank == 0:
        if stats is not None:
            passes = f" ({stats.passes} passes)" if stats.passes > 1 else ""
            print(f"[lorasb] estimation: {stats.micro_batches_per_rank} micro-batches per rank{passes} in "
                  f"{stats.seconds:.2f}s, lr_eff {lr_eff:.3g}")
        print(f"[lorasb] {method.name} init of {len(inits)} layers: {init_seconds:.2f}s on rank 0")
        if method.decomposes and inits:
            energies, iterations = [i.energy for i in inits.values()], [i.svd_iterations for i in inits.values()]
            print(f"[lorasb] SVD ({cfg.lorasb.svd}): captured energy min {min(energies):.3f} mean "
                  f"{sum(energies) / len(energies):.3f}; iterations max {max(iterations)}")
    return inits, meta, stats


# --------------------------------------------------------------------------- the init file's metadata


def init_metadata(cfg: RunConfig) -> dict:
    """What an init file must agree on with the run that reuses it."""
    return {"model": cfg.model.name_or_path or builtin_name(cfg.model.task), "method": cfg.lorasb.method,
            "task": cfg.model.task, "target_modules": list(cfg.lorasb.target_modules), "r": cfg.lorasb.r}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that made an init file."""
    import deepspeed
    import transformers

    from . import __version__

    return {"lorasb_ds": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def new_init_id() -> str:
    return uuid.uuid4().hex
