"""Throughput accounting: the documented FLOP count of one iteration and device peaks (MFU)."""
from __future__ import annotations

import torch

from .config import TrainConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU; fp32 runs are reported against
# the same peak (what mixed precision could reach).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
               "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "RTX 2080 Ti": 107.0, "T4": 65.0}


def flops_per_iteration(cfg: TrainConfig, target_hw: tuple[int, int]) -> float | None:
    """Documented FLOP count of one iteration per rank (docs/training.md, "MFU").

    With F = backbone+decode forward and P = projection head forward per crop-sized image
    (``sepico_fast.models.flops``), backward = 2× forward, per image pair:
      student: 3 × [(F+P) source + (F+P) target crop + F mix]       (target pass counted with decode)
      teacher: F·(target area / crop area) + F crop regen + (F+P) weak source
    source_only: 3 × (F) per source image.
    """
    try:
        from ..models.flops import model_cost
        c = model_cost(cfg.arch, *cfg.crop_hw, num_classes=cfg.num_classes, proj_dim=cfg.proj_dim)
    except Exception:
        return None
    f, p = float(c.flops_infer), float(c.flops_proj)
    if cfg.method == "source_only":
        return 3 * f * cfg.batch_size
    contrast = 1.0  # worst case: after contrast_start
    area = target_hw[0] * target_hw[1] / (cfg.crop_hw[0] * cfg.crop_hw[1])
    student = 3 * ((f + contrast * p) + contrast * (f + p) + f)
    teacher = f * area + f + (f + p)
    return (student + teacher) * cfg.batch_size


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val
    return None
