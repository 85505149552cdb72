"""Throughput accounting: the FLOPs one iteration executes, phase by phase, and device peaks (MFU).

``flops_per_iteration`` counts the passes ``train_step`` runs (docs/training.md, "MFU"),
from the per-image forward costs of ``sepico_fast.models.flops.model_cost`` at the size
each pass sees: B = backbone, D = decode head, P = projection head; a backward costs 2×
its forward. Per image pair (batch size b multiplies everything), with the source crop c,
the full target image t and the target crop t' (= t when the crop is the whole image):

    teacher   (B+D)(t)  pseudo labels on the full target image
              (B+D)(t') regenerated on the crop          (when t' != t and --regen-pseudo)
              (B+P)(c)  weak source, for the class statistics (no decode head)
              Dark Zurich: the first two again on the day image
    student   3 (B+D)(c)              source, seg CE
              3 P(c)                  source contrast             (from --contrast-start)
              3 (B+P)(t')             target contrast, no decode  (from --contrast-start)
              3 (B+D)(c)              ClassMix
    source-only: 3 (B+D)(c)

Only matrix products and convolutions are counted (the FLOP counter's convention), so the
contrast losses (N×A×C products) and the pixel ops are left out; the first layer's
backward needs no input gradient, so true backward FLOPs are a little under 2×. Debug-image
iterations also decode the teacher's source features; that rare pass is not counted.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from .config import TrainConfig

# Dense (no 2:4 sparsity) 16-bit tensor-core peaks in TFLOP/s, FP32 accumulate, from the
# vendor datasheets (half their "with sparsity" figure). bf16 where the GPU has it; fp16 on
# Volta/Turing, which --amp uses there. fp32 runs are reported against the same peak
# (what mixed precision could reach). The first pattern matching the CUDA device name wins.
PEAKS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.4),
    (r"\bH200\b.*\bNVL\b", 835.5),
    (r"\bH200\b", 989.4),                   # SXM
    (r"\bH100\b.*\bNVL\b", 835.5),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.4),                   # SXM ("H100 80GB HBM3")
    (r"\bA100\b", 312.0),                   # SXM4 and PCIe, 40 and 80 GB
    (r"\bA30\b", 165.0),
    (r"\bA40\b", 149.7),
    (r"\bA10\b", 125.0),                    # not the A10G (AWS publishes no tensor peak)
    (r"\bL40S\b", 362.05),
    (r"\bL40\b", 181.05),
    (r"\bL4\b", 121.0),
    (r"RTX 6000 Ada", 364.2),
    (r"RTX A6000\b", 154.8),
    (r"RTX 4090\b", 165.2),
    (r"RTX 3090$", 71.0),
    (r"RTX 2080 Ti\b", 53.8),               # fp16 (Turing GeForce: FP32 accumulate at half rate)
    (r"\bV100S\b", 130.0),                  # fp16
    (r"\bV100\b.*\bPCIE\b", 112.0),         # fp16
    (r"\bV100\b", 125.0),                   # fp16, SXM2
    (r"\bT4\b", 65.0),                      # fp16
)


def peak_tflops_for(name: str) -> float | None:
    """Dense 16-bit tensor peak of the GPU called ``name`` (None when unknown)."""
    for pattern, tflops in PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops
    return None


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class IterationFlops:
    """FLOPs of one iteration per rank, before and from ``contrast_start``."""
    before_contrast: float
    after_contrast: float
    contrast_start: int

    def at(self, it: int) -> float:
        return self.after_contrast if it >= self.contrast_start else self.before_contrast

    def between(self, start: int, stop: int) -> float:
        """Sum over iterations start .. stop - 1."""
        if stop <= start:
            return 0.0
        n_before = max(0, min(stop, self.contrast_start) - start)
        return n_before * self.before_contrast + (stop - start - n_before) * self.after_contrast


@functools.lru_cache(maxsize=None)
def _costs(arch: str, height: int, width: int, num_classes: int, proj_dim: int) -> tuple[float, float, float]:
    """(B, D, P) forward FLOPs of one image of height × width."""
    from ..models.flops import model_cost
    c = model_cost(arch, height, width, num_classes=num_classes, proj_dim=proj_dim)
    return float(c.flops_backbone), float(c.flops_decode), float(c.flops_proj)


def flops_per_iteration(cfg: TrainConfig, target_hw: tuple[int, int],
                        day_images: bool | None = None) -> IterationFlops | None:
    """What ``train_step`` executes per rank (module docstring); None when the model's FLOPs
    cannot be counted. ``day_images``: the target batch has Dark Zurich day images
    (default: the target is Dark Zurich)."""
    day_images = cfg.dark_zurich if day_images is None else day_images
    crop = cfg.crop_hw
    tgt = (int(target_hw[0]), int(target_hw[1]))
    tgt_crop = (min(crop[0], tgt[0]), min(crop[1], tgt[1]))
    try:
        cost = functools.partial(_costs, cfg.arch, num_classes=cfg.num_classes, proj_dim=cfg.proj_dim)
        b_c, d_c, p_c = cost(*crop)
        if cfg.method == "source_only":
            per_image = 3 * (b_c + d_c)
            return IterationFlops(per_image * cfg.batch_size, per_image * cfg.batch_size, 0)
        b_t, d_t, _ = cost(*tgt)
        b_tc, d_tc, p_tc = cost(*tgt_crop) if tgt_crop != crop else (b_c, d_c, p_c)
    except Exception:
        return None
    views = 2 if day_images else 1                      # night (+ day) image per target
    teacher = views * (b_t + d_t) + (b_c + p_c)
    if tgt_crop != tgt and cfg.regen_pseudo:
        teacher += views * (b_tc + d_tc)
    student = 3 * (b_c + d_c) + 3 * (b_c + d_c)         # source seg CE + ClassMix
    contrast = 3 * p_c + 3 * (b_tc + p_tc)              # source projection + target pass
    before = (teacher + student) * cfg.batch_size
    after = (teacher + student + contrast) * cfg.batch_size
    return IterationFlops(before, after, cfg.contrast_start)


def mfu(flops_per_rank: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation of one rank: its FLOPs per second over ONE device's peak
    (every rank does the same work on its own device, so this is also the job's MFU)."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops_per_rank / seconds / (peak_tflops * 1e12)
