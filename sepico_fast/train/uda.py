"""UDA building blocks of the SePiCo iteration (method §6 steps 1-3, 8).

Everything here runs on the device without host syncs: the teacher EMA is one fused
``torch._foreach_lerp_`` over all parameters, pseudo labels and their weight q stay
tensors.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels import CITYSCAPES_CLASS_FREQ, log_frequency_weights

IGNORE = 255

# Dark Zurich: classes whose appearance changes little between day and night
# (road..fence, vegetation..sky), method §6.
SHIFT_INSENSITIVE = ((0, 5), (8, 11))


def log_frequency_class_weights(freq=CITYSCAPES_CLASS_FREQ, std: float = 0.05) -> torch.Tensor:
    """Training-time Dark Zurich class weights (method §6): the log-frequency weights of
    ``data.labels.log_frequency_weights`` with scale ``std`` (0.05), as float32. The same
    function gives the test-time weights (``evaluate.dark_zurich_class_weights``, 0.16)."""
    return torch.from_numpy(log_frequency_weights(std, freq)).float()


# ----------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------
def _is_stochastic(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.modules.dropout._DropoutNd) or "droppath" in name or "drop_path" in name


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the student that never needs gradients.

    It stays in training mode (BN uses batch statistics and updates its own running
    statistics, an upstream quirk) but its dropout and drop-path are switched off.
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    set_teacher_mode(teacher)
    return teacher


def set_teacher_mode(teacher: nn.Module) -> None:
    teacher.train()
    for m in teacher.modules():
        if _is_stochastic(m):
            m.eval()
        # timm-style DropPath keeps its rate in an attribute and checks self.training;
        # some implementations check the rate instead, so zero it too.
        if "droppath" in type(m).__name__.lower() and hasattr(m, "drop_prob"):
            m.drop_prob = 0.0


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], it: int,
               alpha: float) -> None:
    """θ_T ← α_t θ_T + (1 − α_t) θ_S with α_t = min(1 − 1/(t+1), α); a copy at t = 0.

    Parameters only (buffers such as BN statistics are the teacher's own). One
    ``_foreach_lerp_`` launch: θ_T + w (θ_S − θ_T) with w = 1 − α_t.
    """
    if it == 0:
        torch._foreach_copy_(teacher_params, student_params)
        return
    alpha_t = min(1.0 - 1.0 / (it + 1), alpha)
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - alpha_t)


# ----------------------------------------------------------------------------------------
# Pseudo labels
# ----------------------------------------------------------------------------------------
def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def probs_to_pseudo(prob_map: torch.Tensor, threshold: float):
    """prob_map [B,C,H,W] -> (p [B,H,W] fp32, ŷ [B,H,W] int64, q 0-d fp32 = mean(p ≥ thr))."""
    prob, label = prob_map.float().max(dim=1)
    q = (prob >= threshold).float().mean()
    return prob, label, q


def fuse_day_night(day_prob: torch.Tensor, night_prob: torch.Tensor, class_weight: torch.Tensor | None,
                   day_ratio: float = 0.8, ranges=SHIFT_INSENSITIVE) -> torch.Tensor:
    """Dark Zurich fusion (method §6): shift-insensitive classes take the day probability with
    weight day_ratio where it exceeds 0.4 (else 1 − day_ratio); the others the night one."""
    day_prob = day_prob.float()
    night_prob = night_prob.float()
    insensitive = torch.zeros(day_prob.shape[1], dtype=torch.bool, device=day_prob.device)
    for lo, hi in ranges:
        insensitive[lo:hi] = True
    insensitive = insensitive.view(1, -1, 1, 1)
    w_day = torch.where(day_prob > 0.4, day_ratio, 1.0 - day_ratio)
    w_day = torch.where(insensitive, w_day, torch.zeros_like(w_day))
    mixed = w_day * day_prob + (1.0 - w_day) * night_prob
    if class_weight is not None:
        mixed = mixed * class_weight.view(1, -1, 1, 1).to(mixed)
    return mixed


def pseudo_weight_map(q: torch.Tensor, shape: tuple[int, int, int], ignore_top: int,
                      ignore_bottom: int) -> torch.Tensor:
    """Pixel weight [B,H,W]: q everywhere, 0 in the ignored top/bottom rows."""
    b, h, w = shape
    rows = torch.arange(h, device=q.device)
    keep = (rows >= ignore_top) & (rows < h - ignore_bottom)
    return (q * keep.to(q.dtype)).view(1, h, 1).expand(b, h, w).contiguous()
