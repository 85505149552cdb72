"""Learning-rate schedule: linear warm-up, then polynomial decay (SPEC §6).

The factor multiplies each parameter group's base learning rate (``initial_lr``):

    poly(t)   = (1 - t / T) ** power                            (reaches 0 at t = T)
    factor(t) = poly(t) * (1 - (1 - t / W) * (1 - r))   for t < W   (mmcv linear warm-up)
    factor(t) = poly(t)                                 otherwise

with T = max_iters, W = warm-up iterations and r = warm-up ratio (1e-6): the warm-up
scales the *regular* (poly) rate, starting at r times it. The schedule is a pure
function of the iteration, so resuming needs nothing but the iteration number.
"""
from __future__ import annotations

import torch


def lr_factor(it: int, max_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
              power: float = 1.0) -> float:
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    factor = max(0.0, 1.0 - it / max_iters) ** power
    if it < warmup_iters:
        factor *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its ``initial_lr`` times ``factor`` (a Python float: no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
