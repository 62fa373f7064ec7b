"""Model surgery: find the target Linears, check them, wrap them in ``LoRASBLinear``.

Run before ``deepspeed.initialize`` (DeepSpeed hooks only the modules that exist then). Works on a
ZeRO-3 model whose weights are already partitioned (shapes come from ``ds_shape``) and on a model on
the ``meta`` device, which is how the targets are checked before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ConfigError
from .layer import LoRASBLinear, shape_of, share_inputs
from .methods import METHODS


def find_targets(model: nn.Module, target_modules: list[str], r: int) -> list[tuple[str, nn.Linear]]:
    """Modules whose name ends with one of the suffixes, in model order; checked for type and rank."""
    found: list[tuple[str, nn.Module]] = []
    hits = {t: 0 for t in target_modules}
    for name, module in model.named_modules():
        matched = [t for t in target_modules if name == t or name.endswith("." + t)]
        for t in matched:
            hits[t] += 1
        if matched:
            found.append((name, module))
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"lorasb.target_modules: {missing} match no module of this model; "
            f"its Linear layers are named {linears}"
        )
    for name, module in found:
        if isinstance(module, LoRASBLinear):
            raise ConfigError(f"module '{name}' is already a LoRA-SB layer; wrap a model only once")
        if type(module) is not nn.Linear:
            raise ConfigError(
                f"lorasb.target_modules: '{name}' is a {type(module).__name__}, not a torch.nn.Linear; "
                "remove its suffix from the targets"
            )
    # r is bound by the narrowest target: name it, and the limit that makes every target valid
    name, module = min(found, key=lambda item: min(shape_of(item[1])))
    out_f, in_f = shape_of(module)
    if r > min(out_f, in_f):
        too_narrow = sorted({n.rsplit(".", 1)[-1] for n, m in found if min(shape_of(m)) < r})
        raise ConfigError(
            f"lorasb.r = {r} exceeds min(out, in) = {min(out_f, in_f)} of '{name}' ({out_f} x {in_f}), the "
            f"narrowest target; lower lorasb.r to at most {min(out_f, in_f)}, or drop the targets narrower "
            f"than {r} ({', '.join(too_narrow)})"
        )
    return found


def wrap_targets(model: nn.Module, target_modules: list[str], r: int, dropout: float = 0.0,
                 method: str = "lorasb", fuse: bool = False) -> dict[str, LoRASBLinear]:
    """Freeze the whole model, replace every target by a ``LoRASBLinear``; returns {name: layer}.
    ``fuse``: siblings that read one input (q/k/v, gate/up) share their A-projection (``layer.share_inputs``).

    A method without adapter layers (``full``) wraps nothing and leaves every weight trainable
    (returns {}); the others train the factors ``methods.METHODS`` names."""
    if not METHODS[method].wraps:
        model.requires_grad_(True)
        return {}
    targets = find_targets(model, target_modules, r)
    model.requires_grad_(False)
    layers: dict[str, LoRASBLinear] = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRASBLinear(linear, r, dropout, trainable=METHODS[method].trained)
        setattr(parent, child, layer)
        layers[name] = layer
    if fuse:
        share_inputs(layers)
    return layers


HEAD_NAMES = ("classifier", "score")
"""Classification heads of transformers' ``*ForSequenceClassification`` models (RoBERTa/BERT, Llama)."""


def modules_to_save(model: nn.Module, names: list[str] | None, task: str) -> list[str]:
    """Full names of the modules trained in full beside the adapter (``lorasb.modules_to_save``).

    ``names`` are suffixes, as for the targets; ``None`` means the classification head for
    ``seq_cls`` and nothing for ``causal_lm``. A name matching nothing is an error.
    """
    if names is None:
        names = [h for h in HEAD_NAMES if any(n == h or n.endswith("." + h) for n, _ in model.named_modules())]
        if task == "seq_cls" and not names:
            raise ConfigError(f"model.task=seq_cls but the model has no module named {' or '.join(HEAD_NAMES)}; "
                              "name its classification head in lorasb.modules_to_save")
        if task != "seq_cls":
            return []
    found = []
    for suffix in names:
        hits = [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]
        if not hits:
            raise ConfigError(f"lorasb.modules_to_save: '{suffix}' matches no module of this model")
        found += [h for h in hits if h not in found]
    return found


def train_modules(model: nn.Module, names: list[str]) -> None:
    """Make every parameter of the named modules trainable (after ``wrap_targets`` froze the model)."""
    for name in names:
        model.get_submodule(name).requires_grad_(True)


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    """Every trained number (LoRA-SB: the sum of r^2 over the wrapped layers)."""
    adapter_frozen: int
    """Frozen adapter tensors (LoRA-SB: B and A, sum of (out + in) * r)."""
    base: int
    """Every parameter of the original model (frozen unless ``method: full``)."""
    total: int
    """Every number the model computes with: base plus all adapter tensors."""

    def describe(self) -> str:
        return (f"trainable {self.trainable:,} ({100 * self.trainable / self.total:.4f}% of all) | "
                f"frozen adapter {self.adapter_frozen:,} | base {self.base:,}")


def count_parameters(model: nn.Module, layers: dict[str, LoRASBLinear]) -> ParameterCounts:
    """Counts from full shapes, so they are right when ZeRO-3 holds only a shard on this rank."""
    def size(t: torch.Tensor) -> int:
        return getattr(t, "ds_numel", t.numel())

    adapter = [t for layer in layers.values() for t in (layer.lora_B, layer.lora_A, layer.lora_R)]
    ours = {id(t) for t in adapter}
    base = sum(size(p) for p in model.parameters() if id(p) not in ours)
    return ParameterCounts(trainable=sum(size(p) for p in model.parameters() if p.requires_grad),
                           adapter_frozen=sum(size(t) for t in adapter if not t.requires_grad),
                           base=base, total=base + sum(size(t) for t in adapter))
