"""Learning-rate schedule: linear warm-up, then polynomial decay (method §6).

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


# Iteration counts that the 'samples' DDP schedule divides by the number of processes.
SAMPLE_SCHEDULE_FIELDS = ("iters", "warmup_iters", "contrast_start", "eval_interval", "checkpoint_interval")


def ddp_schedule(cfg, world_size: int):
    """(config to run, record of the schedule) for ``world_size`` processes.

    ``cfg.ddp_schedule == "steps"`` (default) or one process: ``cfg`` itself — N processes
    then train ``iters`` steps of N × the batch, i.e. N × the samples of the one-GPU run,
    at the same learning rate. ``"samples"``: a copy whose ``SAMPLE_SCHEDULE_FIELDS`` are
    divided by N — ``iters`` rounded up (never fewer samples than one GPU sees), the others
    rounded to the nearest step and kept ≥ 1 unless 0 — so the run sees the one-GPU number
    of samples with the same learning rate. ``--stop-at`` and the log/debug intervals count
    the run's own steps and are not divided.
    """
    import dataclasses

    world_size = int(world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    record = {"ddp_schedule": cfg.ddp_schedule, "world_size": world_size,
              "images_per_step": cfg.batch_size * world_size, "divided": {}}
    if cfg.ddp_schedule != "samples" or world_size == 1:
        return cfg, record
    changes = {}
    for name in SAMPLE_SCHEDULE_FIELDS:
        value = int(getattr(cfg, name))
        if name == "iters":
            changes[name] = -(-value // world_size)
        else:
            changes[name] = 0 if value == 0 else max(1, (2 * value + world_size) // (2 * world_size))
        record["divided"][name] = {"requested": value, "run": changes[name]}
    return dataclasses.replace(cfg, **changes), record
