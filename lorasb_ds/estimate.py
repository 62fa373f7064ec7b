"""Distributed estimation of the summed weight gradient G of every target Linear.

LoRA-SB needs, per target ``W0`` (out x in), the gradient of the training loss with respect to ``W0``
over a few estimation batches. Under ZeRO-3 ``W0`` is frozen and partitioned: DeepSpeed keeps no
gradient for it, and making it trainable would cost an fp32 master and a gradient partition for the
whole model. Instead every ``LoRASBLinear`` gets a *gradient tap* on its base output for the duration
of the pass: an autograd function that is the identity in forward and, in backward, turns the
output gradient ``g`` (tokens x out) and the saved input ``x`` (tokens x in) into the local weight
gradient ``g^T x`` (out x in, fp32). The base Linear is still called normally, so ZeRO-3 gathers and
releases ``W0`` as usual.

Which rank does what:

* Each module has one **owner** rank (``assign_owners``: balanced by out * in, deterministic).
* Every rank runs the same number of micro-batches (a rank short of data runs zero-weight passes).
* With a budget for the accumulators (``estimation_groups``) the modules are estimated group by group,
  each group in its own pass over the same micro-batches; a module's G does not depend on the grouping.
* As the local gradients appear in backward they are gathered per owner into buckets of
  ``lorasb.est_bucket_mb`` and each bucket is reduced to its owner in one ``dist.reduce``; only the
  owner keeps an fp32 accumulator for the module. No rank ever holds every module's gradient: per
  rank the memory is its own accumulators plus about two buckets (one filling, one in flight).

``G`` is the gradient of the mean of the micro-batch losses (each the mean token loss of its
micro-batch) over all real micro-batches of all ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, LoraSBConfig
from .data import collate, estimation_batches
from .layer import LoRASBLinear

FP32 = 4


def bucket_bytes(est_bucket_mb: float) -> int:
    """``lorasb.est_bucket_mb`` in bytes."""
    return int(est_bucket_mb * 1e6)


DEFAULT_BUCKET_BYTES = bucket_bytes(LoraSBConfig.est_bucket_mb)


def estimation_groups(shapes: dict[str, tuple[int, int]], owners: dict[str, int],
                      max_bytes: int | None) -> list[list[str]]:
    """Modules in model order, cut into consecutive groups whose fp32 accumulators (4 * out * in on
    the owner) stay within ``max_bytes`` on every rank; one group when ``max_bytes`` is None.

    The same on every rank. Raises ConfigError when one module alone is over the budget.
    """
    if max_bytes is None:
        return [list(shapes)]
    groups: list[list[str]] = [[]]
    load: dict[int, int] = {}
    for name, (out_f, in_f) in shapes.items():
        need = FP32 * out_f * in_f
        if need > max_bytes:
            raise ConfigError(
                f"lorasb.est_max_accum_gb = {max_bytes / 1e9:g} is below the fp32 accumulator of '{name}' "
                f"({need / 1e9:.4g} GB); raise it to at least that, or leave it empty")
        if load.get(owners[name], 0) + need > max_bytes:
            groups.append([])
            load = {}
        groups[-1].append(name)
        load[owners[name]] = load.get(owners[name], 0) + need
    return groups


def assign_owners(shapes: dict[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """Greedy longest-first assignment of modules to ranks by out * in; ties go to the lower rank.

    The same on every rank (a pure function of the module shapes and the world size).
    """
    load = [0] * world_size
    owners: dict[str, int] = {}
    names = list(shapes)
    size = {n: shapes[n][0] * shapes[n][1] for n in names}
    for name in sorted(names, key=lambda n: -size[n]):  # stable: equal sizes keep model order
        rank = min(range(world_size), key=lambda k: (load[k], k))
        owners[name] = rank
        load[rank] += size[name]
    return {name: owners[name] for name in names}


class _WeightGradTap(torch.autograd.Function):
    """Identity on ``y``; in backward hands ``(g, x)`` to ``sink`` and passes ``g`` through."""

    @staticmethod
    def forward(ctx, y, x, sink):
        ctx.save_for_backward(x)
        ctx.sink = sink
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.sink(g, x)
        return g, None, None


def local_weight_gradient(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """This rank's ``g^T x`` (out x in, fp32) from the output gradient g (..., out) and input x (..., in)."""
    return g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()


class OwnerReducer:
    """Receives local weight gradients during backward and reduces them, coalesced, to their owners.

    Local gradients wait in one bucket per owner rank. When the waiting ones reach ``bucket_bytes``
    (and at ``drain``) each owner's bucket is flattened into one tensor and reduced to that owner by
    one asynchronous ``dist.reduce``, owners in rank order; backward goes on while it runs, and the
    next flush first waits for it. A module larger than the bucket flushes alone; ``bucket_bytes = 0``
    reduces every module on its own. Every rank fills and flushes identically (the backward order and
    the shapes are the same everywhere), so the collectives match.

    Memory beyond the accumulators: the waiting gradients and the flush in flight, each at most
    ``bucket_bytes`` plus one module, and the flattened copy while a flush is made.
    """

    def __init__(self, layers: dict[str, LoRASBLinear], owners: dict[str, int], rank: int,
                 device: torch.device, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.owners, self.rank, self.bucket_bytes = owners, rank, bucket_bytes
        self.grads: dict[str, torch.Tensor] = {
            name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=device)
            for name, layer in layers.items() if owners[name] == rank
        }
        self.reductions = 0
        """Collective calls issued so far."""
        self._waiting: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._waiting_bytes = 0
        self._in_flight: list[tuple[int, list[tuple[str, torch.Size]], torch.Tensor, object]] = []

    def sink_for(self, name: str):
        def sink(g: torch.Tensor, x: torch.Tensor) -> None:
            local = local_weight_gradient(g, x)
            self._waiting.setdefault(self.owners[name], []).append((name, local))
            self._waiting_bytes += local.nbytes
            if self._waiting_bytes >= self.bucket_bytes:
                self._flush()
        return sink

    def reduce(self, flat: torch.Tensor, owner: int):
        """Start the reduction of ``flat`` to ``owner``; returns its work handle."""
        return dist.reduce(flat, dst=owner, async_op=True)

    def _flush(self) -> None:
        self._finish_in_flight()
        for owner in sorted(self._waiting):
            entries = self._waiting.pop(owner)  # dropped once flattened: a bucket's gradients live once
            flat = torch.cat([t.reshape(-1) for _, t in entries]) if len(entries) > 1 else entries[0][1].reshape(-1)
            self._in_flight.append((owner, [(n, t.shape) for n, t in entries], flat, self.reduce(flat, owner)))
            self.reductions += 1
        self._waiting_bytes = 0

    def _finish_in_flight(self) -> None:
        for owner, entries, flat, work in self._in_flight:
            work.wait()
            if owner != self.rank:
                continue
            offset = 0
            for name, shape in entries:
                self.grads[name] += flat[offset:offset + shape.numel()].view(shape)
                offset += shape.numel()
        self._in_flight = []

    def drain(self) -> None:
        """Flush what waits and wait for every reduction: the owners' ``grads`` are then complete."""
        self._flush()
        self._finish_in_flight()


def weighted_estimation_batches(examples: list[dict], num_samples: int, micro_batch: int, rank: int,
                                world_size: int, seed: int, pad_token_id: int
                                ) -> list[tuple[dict[str, torch.Tensor], float]]:
    """This rank's estimation micro-batches as ``(batch, weight)``, the same count on every rank.

    weight = 1 / (real micro-batches over all ranks), so the summed gradient is the mean of the
    micro-batch gradients; a rank short of samples gets padding passes (example 0, weight 0).
    """
    def share(k: int) -> list[list[int]]:
        return estimation_batches(num_samples, len(examples), micro_batch, k, world_size, seed)

    real = sum(len(idx) > 0 for k in range(world_size) for idx in share(k))
    return [(collate([examples[i] for i in (idx or [0])], pad_token_id), 1.0 / real if idx else 0.0)
            for idx in share(rank)]


def check_finite(grads: dict[str, torch.Tensor], names: list[str], device: torch.device) -> None:
    """Raise on every rank if any owner's G holds NaN or inf, naming the module. Collective."""
    bad = torch.tensor([int(n in grads and not bool(torch.isfinite(grads[n]).all())) for n in names],
                       device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.any():
        first = names[int(bad.nonzero()[0])]
        raise FloatingPointError(
            f"the estimated gradient of '{first}' holds NaN or inf ({int(bad.sum())} module(s) in all); "
            "check the estimation data, or use fp32 / a smaller lorasb.est_micro_batch")


@dataclass
class EstimationStats:
    micro_batches_per_rank: int
    seconds: float
    passes: int = 1

    def add(self, other: "EstimationStats") -> "EstimationStats":
        """Two passes over the same micro-batches (two groups of modules)."""
        return EstimationStats(self.micro_batches_per_rank, self.seconds + other.seconds,
                               self.passes + other.passes)


def layer_shapes(layers: dict[str, LoRASBLinear]) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of the wrapped layers, in model order."""
    return {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}


def max_accum_bytes(est_max_accum_gb: float | None) -> int | None:
    """``lorasb.est_max_accum_gb`` in bytes (None: no budget)."""
    return None if est_max_accum_gb is None else int(est_max_accum_gb * 1e9)


def estimate_gradients(model: torch.nn.Module, layers: dict[str, LoRASBLinear],
                       batches: list[tuple[dict[str, torch.Tensor], float]], owners: dict[str, int],
                       device: torch.device, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       reducer: OwnerReducer | None = None) -> tuple[dict[str, torch.Tensor], EstimationStats]:
    """Sum of weight gradients, reduced to owners. Runs on every rank; collective.

    ``batches``: this rank's micro-batches as ``(batch, weight)``; the loss of each is multiplied by
    its weight (``1 / real micro-batches`` overall, 0 for a padding pass). Every rank must pass the
    same number. ``model`` is the (ZeRO-3 hooked) module of an initialized engine.
    Returns ``{name: G}`` (out x in, fp32) for the modules this rank owns.
    ``bucket_bytes``: the size of the coalesced reductions (``OwnerReducer``). ``reducer``: where the
    local gradients go; default ``OwnerReducer(layers, owners, rank, device, bucket_bytes)`` (another
    strategy with the same ``sink_for``/``drain``/``grads`` can be compared against it).
    """
    rank = dist.get_rank()
    reducer = reducer or OwnerReducer(layers, owners, rank, device, bucket_bytes)
    for name, layer in layers.items():
        sink = reducer.sink_for(name)
        layer.probe = lambda y, x, _layer, sink=sink: _WeightGradTap.apply(y, x, sink)
    # No parameter requires grad in the probed forward (a trainable head is frozen for the pass, so no
    # gradient reaches the optimizer): let the graph start at the embeddings.
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for batch, weight in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss * weight
            loss.backward()
            reducer.drain()
    finally:
        hook.remove()
        for p in trained:
            p.requires_grad_(True)
        for layer in layers.values():
            layer.probe = None
        model.train(was_training)
    return reducer.grads, EstimationStats(len(batches), time.perf_counter() - start)
