"""Step counts and the learning-rate schedule, derived once from the data and the batch layout.

    total steps = train.max_steps, or train.epochs x (micro-batches per rank per epoch // accumulation)
    warm-up     = ceil(train.warmup_ratio x total), at least 1
    lr(k)       = train.lr x (k + 1) / warm-up during warm-up, then constant, linear or cosine to 0
    lr_eff      = lorasb.lr_eff, or train.lr / warm-up (the rate of the first optimizer step)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ConfigError, RunConfig
from .data import train_batches


@dataclass
class Schedule:
    """Step counts of a run (identical on every rank)."""

    micro_batches_per_epoch: int
    """Micro-batches each rank sees in one pass over the data."""
    total_steps: int
    """Optimizer steps of the whole run."""
    warmup_steps: int
    """Steps of the linear warm-up."""
    lr_eff: float
    """Step size of LoRA-SB's first-update approximation."""


def make_schedule(cfg: RunConfig, num_examples: int, micro_batch: int, grad_accum: int, world: int) -> Schedule:
    per_epoch = len(train_batches(num_examples, micro_batch, 0, world, 0, cfg.train.seed))
    steps_per_epoch = per_epoch // grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the data gives {per_epoch} micro-batches per rank per epoch, fewer than "
                          f"gradient_accumulation_steps = {grad_accum}; use more data or smaller batches")
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = max(1, math.ceil(cfg.train.warmup_ratio * total))
    lr_eff = cfg.lorasb.lr_eff or cfg.train.lr / warmup
    return Schedule(per_epoch, total, warmup, lr_eff)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of train.lr at optimizer step k (0-based): linear warm-up to 1, then decay to 0."""

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (k - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
