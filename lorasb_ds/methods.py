"""What differs between the methods the pipeline trains: one row per ``lorasb.method``.

Everything else (data, engine, loop, checkpoints, adapter format, export) is shared.

    method   adapter layers  trained          B, A, R from
    lorasb   yes             R (r x r)        the estimated first update: estimation pass, then its SVD
    loraxs   yes             R (r x r)        the SVD of W0; R small and random
    lora     yes             B, A             B = 0, A Kaiming-uniform (seeded), R = (lora_alpha / r) I
    full     none            every weight     (nothing: the model's own weights)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    trained: tuple[str, ...]
    """Which of the adapter layer's B, A, R are parameters; empty: no adapter layers, every weight trains."""
    init: str
    """Where B, A, R come from: ``gradient`` (estimation + SVD), ``weight`` (SVD of W0), ``seeded``, or
    ``""`` (no adapter)."""

    @property
    def wraps(self) -> bool:
        """Whether the targets are wrapped in adapter layers."""
        return bool(self.trained)

    @property
    def estimates(self) -> bool:
        """Whether the run starts with the estimation pass over the data."""
        return self.init == "gradient"

    @property
    def decomposes(self) -> bool:
        """Whether B, A come from a truncated SVD (the ``lorasb.svd*`` settings apply)."""
        return self.init in ("gradient", "weight")

    @property
    def alpha_scaled(self) -> bool:
        """Whether R is the fixed scaling ``(lora_alpha / r) I`` (``lorasb.lora_alpha`` applies)."""
        return self.init == "seeded"


METHODS = {m.name: m for m in (
    Method("lorasb", trained=("R",), init="gradient"),
    Method("loraxs", trained=("R",), init="weight"),
    Method("lora", trained=("B", "A"), init="seeded"),
    Method("full", trained=(), init=""),
)}
