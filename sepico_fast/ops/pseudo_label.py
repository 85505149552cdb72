"""Pseudo labels from teacher logits (method §6 step 2), without the host round trip.

    prob[b,y,x]  = max_c softmax(logits[b,:,y,x])_c          (fp32)
    label[b,y,x] = arg-max_c logits[b,c,y,x]                 (first class wins ties)
    q            = #{prob >= threshold} / (B·H·W)             (0-d fp32 on the device)

Upstream computes q with ``.cpu()`` and ``.item()``; here it stays a device tensor, so the
training step can multiply the pixel weight by it without waiting for the GPU. The threshold
is compared in fp32, as torch compares an fp32 tensor with a Python float.
"""
from __future__ import annotations

import torch

from ..dispatch import resolve_impl
from . import _validate

__all__ = ["pseudo_label"]


def pseudo_label(logits: torch.Tensor, threshold: float = 0.968, *,
                 impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prob [B,H,W] fp32, label [B,H,W] int64, q 0-d fp32) from logits [B,C,H,W].

    impl: None (CUDA extension for CUDA fp32/fp16/bf16 logits when built, else torch) |
    "torch" | "cuda". The CUDA kernel reads the logits once (online softmax); the torch path
    is softmax + max like upstream. The two labels can differ only where two logits are within
    float rounding of each other (the kernel takes the arg-max of the logits, the torch path
    that of the rounded probabilities).
    """
    _validate.float_tensor("logits", logits, ndim=4)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class channel, got {tuple(logits.shape)}")
    threshold = float(threshold)
    chosen = resolve_impl("pseudo_label", impl, logits.device)
    if chosen == "cuda" and logits.dtype != torch.float64:
        return torch.ops.sepico_fast.pseudo_label(logits.contiguous(), threshold)
    prob, label = torch.softmax(logits.float(), dim=1).max(dim=1)
    confident = (prob >= threshold).sum(dtype=torch.int64)
    # Count / total in float64 (upstream divides Python ints), then fp32 like the kernel;
    # an empty batch gives 0/0 = NaN.
    q = (confident.double() / prob.numel()).float()
    return prob, label, q
