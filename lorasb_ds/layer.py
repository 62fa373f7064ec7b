"""The LoRA-SB linear layer.

LoRA-SB (Ponkshe et al., "Initialization using Update Approximation is a Silver Bullet for Extremely
Efficient Low-Rank Fine-Tuning", arXiv 2411.19557) adapts a frozen linear map ``W0`` (out x in) as

    y = W0 x + b + s * B R A dropout(x),        s = 1

with ``B`` (out x r) and ``A`` (r x in) frozen and only the small ``R`` (r x r) trained: r^2 trainable
numbers per layer, whatever the layer's width. B, A and the initial R come from the truncated SVD of
an approximation of the first full fine-tuning update ``dW`` (see ``init.py``):

    dW ~= U_r S_r V_r^T,    B = U_r,  R = S_r,  A = V_r^T

so at step 0 the adapter is the best rank-r approximation of that update. Because B has orthonormal
columns and A orthonormal rows, the gradient of R is the full weight gradient projected onto the
two subspaces, ``dL/dR = B^T (dL/dW) A^T``, and Adam on R needs no extra scaling (s = 1).

Under ZeRO-3 the wrapped ``base`` Linear keeps its partitioned ``W0``: calling ``self.base(x)`` lets
DeepSpeed gather and release it as for any module. ``R`` is the module's only parameter. ``B`` and
``A`` are non-persistent buffers: DeepSpeed neither partitions nor gathers them (no traffic per step),
they take no optimizer or gradient memory, and they are not written into checkpoints (they live in
the init file, written once).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRASBLinear(nn.Module):
    """``y = base(x) + B (R (A dropout(x)))`` for x of shape (..., in); y is (..., out).

    Forward is three matmuls on (tokens, features) views, the last one accumulating into the base
    output. Backward computes gradients only for the trainable factors (R for LoRA-SB): the frozen
    ones are buffers, so autograd does no work for them.

    ``probe`` is a callable set only during the estimation pass (see ``estimate.py``): the adapter
    path is skipped and ``probe(y, x, self)`` may attach a gradient tap to the base output.

    ``shared``: a ``SharedInput`` when this layer reads the same input as its siblings (q, k, v;
    gate, up): the first of them to see an input computes ``x A^T`` for all in one matmul.
    """

    def __init__(self, base: nn.Linear, r: int, dropout: float = 0.0, trainable: tuple[str, ...] = ("R",)):
        """``trainable``: which of ``"B"``, ``"A"``, ``"R"`` are parameters (trained); the others are
        non-persistent buffers. LoRA-SB and LoRA-XS train ``R``; plain LoRA trains ``B`` and ``A``
        with ``R`` fixed to ``(alpha / r) I`` (see ``init.py``)."""
        super().__init__()
        out_features, in_features = shape_of(base)
        self.base = base
        self.r, self.out_features, self.in_features = r, out_features, in_features
        dtype = base.weight.dtype
        for part, shape in (("B", (out_features, r)), ("A", (r, in_features)), ("R", (r, r))):
            value = torch.zeros(shape, dtype=dtype)
            if part in trainable:
                setattr(self, f"lora_{part}", nn.Parameter(value))
            else:
                self.register_buffer(f"lora_{part}", value, persistent=False)
        self.dropout = dropout  # functional, so no extra module for ZeRO-3 to hook and call per step
        self.probe = None
        self.shared: SharedInput | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe is not None:
            return self.probe(self.base(x), x, self)
        lead, given = x.shape[:-1], x
        x = x.reshape(-1, x.shape[-1])  # (tokens, in): each product below is one 2-D matmul
        y = self.base(x)  # (tokens, out)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        if self.shared is not None:
            h = self.shared.projection(self, given, x) @ self.lora_R.T  # (tokens, r)
        else:
            h = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_R.T  # (tokens, r)
        if h.dtype == y.dtype:
            y = y.addmm_(h, self.lora_B.T)  # y += h B^T inside the matmul: no (tokens, out) temporary
        else:
            y = y + (h @ self.lora_B.T).to(y.dtype)
        return y.view(*lead, y.shape[-1])  # (..., out)

    def delta_weight(self, R: torch.Tensor | None = None) -> torch.Tensor:
        """``s * B R A`` (out x in), the adapter as a dense weight update; R defaults to this module's."""
        R = self.lora_R if R is None else R
        dtype = torch.promote_types(self.lora_B.dtype, torch.float32)  # fp32 at least, fp64 kept
        return self.lora_B.to(dtype) @ R.to(dtype) @ self.lora_A.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
                + (f", dropout={self.dropout}" if self.dropout > 0 else ""))


class SharedInput:
    """Adapter layers that read one input (q, k and v of an attention block; gate and up of an MLP):
    ``x A_i^T`` for all of them is one matmul of x (tokens x in) with the stacked A's (n r x in).

    The first layer called with an input computes every slice and keeps the others' until each
    sibling, called with the very same tensor, takes its own; a sibling called with another input
    computes afresh. Only for frozen A without dropout (``fusable``). Forward and backward equal the
    unfused layers' up to float rounding; nothing is stored in any file."""

    def __init__(self, layers: list[LoRASBLinear]):
        self.layers = layers
        self.input = None  # the tensor the kept slices belong to
        self.slices: dict[int, torch.Tensor] = {}  # id(layer) -> (tokens, r)
        self._stacked, self._stacked_key = None, None

    @staticmethod
    def fusable(layer: LoRASBLinear) -> bool:
        return layer.dropout == 0 and not isinstance(layer.lora_A, nn.Parameter)

    def stacked_A(self) -> torch.Tensor:
        """(n r, in): rebuilt only when some A was written (apply_inits)."""
        key = tuple((l.lora_A.data_ptr(), l.lora_A._version) for l in self.layers)
        if key != self._stacked_key:
            self._stacked, self._stacked_key = torch.cat([l.lora_A for l in self.layers]), key
        return self._stacked

    def projection(self, layer: LoRASBLinear, given: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x A^T`` (tokens, r) of ``layer``, whose forward got ``given`` (x is its 2-D view)."""
        if self.input is not given or id(layer) not in self.slices:
            A = self.stacked_A()
            h = x.to(A.dtype) @ A.T  # (tokens, n r)
            self.slices = {id(l): part for l, part in zip(self.layers, h.split([l.r for l in self.layers], dim=-1))}
            self.input = given
        part = self.slices.pop(id(layer))
        if not self.slices:
            self.input = None  # all taken: keep no reference to the activation
        return part


def share_inputs(layers: dict[str, LoRASBLinear], groups=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                                          ("query", "key", "value"))) -> int:
    """Give siblings that read one input (same parent, names of one of ``groups``) a ``SharedInput``;
    returns the number of groups formed."""
    formed = 0
    by_parent: dict[str, dict[str, LoRASBLinear]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, {})[child] = layer
    for children in by_parent.values():
        for group in groups:
            members = [children[c] for c in group if c in children]
            if len(members) > 1 and all(SharedInput.fusable(m) for m in members):
                shared = SharedInput(members)
                for m in members:
                    m.shared = shared
                formed += 1
    return formed


def shape_of(linear: nn.Linear) -> tuple[int, int]:
    """(out, in) of a Linear whose weight may be a ZeRO-3 partition of shape (0,)."""
    w = linear.weight
    shape = getattr(w, "ds_shape", None) or w.shape
    return int(shape[0]), int(shape[1])


def merged_weight(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``W0 + B R A`` (out x in) from W0 (out x in), B (out x r), A (r x in), R (r x r): the one merge
    formula (``merge``/``unmerge`` here, the shard-wise merge of ``export.py``). The math is fp32 at
    least (fp64 kept); the result has W0's dtype."""
    dtype = torch.promote_types(B.dtype, torch.float32)
    merged = B.to(dtype) @ (R.to(dtype) @ A.to(dtype))  # (out x r) @ (r x in): the only (out x in) temporary
    merged += W0  # in place, promoted
    return merged.to(W0.dtype)


@torch.no_grad()
def merge(layer: LoRASBLinear, R: torch.Tensor | None = None) -> None:
    """``W0 <- W0 + s B R A`` in place (unpartitioned weights only: gather first under ZeRO-3)."""
    R = layer.lora_R if R is None else R
    layer.base.weight.copy_(merged_weight(layer.base.weight, layer.lora_B, layer.lora_A, R))


@torch.no_grad()
def unmerge(layer: LoRASBLinear, R: torch.Tensor | None = None) -> None:
    """Inverse of ``merge``: ``W0 <- W0 - s B R A``."""
    R = layer.lora_R if R is None else R
    layer.base.weight.copy_(merged_weight(layer.base.weight, layer.lora_B, layer.lora_A, -R))
