"""Upstream-style versions of the self-training pixel ops, kept as the benchmark baseline.

They restate what the SePiCo implementation does, structure included: Python loops over
samples and crop tries, ``torch.unique`` per window, a device->host sync (``.item()`` /
``.cpu()``) per try and per pseudo-label call. Not used by the trainer; ``bench/`` times
them against :mod:`sepico_fast.ops`, and the tests use them as a second reference.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["upstream_pseudo_label", "upstream_class_balanced_crop", "upstream_classmix"]


def upstream_pseudo_label(logits: torch.Tensor, threshold: float = 0.968):
    """(prob, label, q as a Python float): softmax, max, and the confident ratio on the host."""
    softmax = torch.softmax(logits.detach(), dim=1)
    prob, label = torch.max(softmax, dim=1)
    confident = prob.ge(threshold).long() == 1
    num_pixels = np.size(np.array(label.cpu()))  # upstream copies the whole map just to count it
    q = torch.sum(confident).item() / num_pixels
    return prob, label, q


def _window_score(window: torch.Tensor, cat_max_ratio: float, ignore_index: int) -> float:
    values, counts = torch.unique(window, return_counts=True)
    counts = counts[values != ignore_index]
    if len(counts) > 1 and torch.max(counts).item() / torch.sum(counts).item() < cat_max_ratio:
        return counts[counts > 1].float().log().sum().item()
    return 0.0


def upstream_class_balanced_crop(img: torch.Tensor, label: torch.Tensor, crop_hw, *,
                                 cat_max_ratio: float = 0.75, ignore_index: int = 255,
                                 num_tries: int = 10, rng: np.random.Generator | None = None,
                                 offsets: torch.Tensor | None = None):
    """Per-sample crop search as upstream: (img crop [B,C,h,w], label crop [B,h,w], origins [B,2]).

    Each of ``num_tries`` windows is scored on the host; the first window with the highest
    score wins. ``offsets`` [B,K,2] replays given windows instead of drawing them with ``rng``.
    """
    h, w = crop_hw
    height, width = label.shape[-2:]
    rng = np.random.default_rng() if rng is None else rng
    hwc = img.permute(0, 2, 3, 1).contiguous()  # upstream crops channels-last per sample
    img_crops, label_crops, origins = [], [], []
    for b in range(label.shape[0]):
        best_score, best_origin = -1.0, None
        tries = num_tries if offsets is None else offsets.shape[1]
        for k in range(tries):
            if offsets is None:
                y0 = int(rng.integers(0, max(height - h, 0) + 1))
                x0 = int(rng.integers(0, max(width - w, 0) + 1))
            else:
                y0, x0 = (int(v) for v in offsets[b, k])
            score = _window_score(label[b, y0:y0 + h, x0:x0 + w], cat_max_ratio, ignore_index)
            if score > best_score:
                best_score, best_origin = score, (y0, x0)
        y0, x0 = best_origin
        img_crops.append(hwc[b, y0:y0 + h, x0:x0 + w].unsqueeze(0))
        label_crops.append(label[b, y0:y0 + h, x0:x0 + w].unsqueeze(0))
        origins.append(best_origin)
    img_out = torch.cat(img_crops, dim=0).permute(0, 3, 1, 2).contiguous()
    return img_out, torch.cat(label_crops, dim=0).long(), torch.tensor(origins)


def upstream_classmix(src_img: torch.Tensor, tgt_img: torch.Tensor, src_lbl: torch.Tensor,
                      tgt_lbl: torch.Tensor, tgt_weight: torch.Tensor,
                      rng: np.random.Generator | None = None):
    """Per-sample ClassMix as upstream: (mixed_img, mixed_lbl, mixed_weight, chosen classes).

    src_lbl [B,1,H,W]; tgt_lbl, tgt_weight [B,H,W]. The class set is ``torch.unique`` of the
    whole source batch (quirk), recomputed for every sample; half of it, rounded up, is drawn.
    """
    rng = np.random.default_rng() if rng is None else rng
    images, labels, weights, chosen_sets = [], [], [], []
    ones = torch.ones_like(tgt_weight[0])
    for i in range(src_img.shape[0]):
        classes = torch.unique(src_lbl)
        n = classes.shape[0]
        pick = rng.choice(n, (n + n % 2) // 2, replace=False)
        chosen = classes[torch.as_tensor(pick, device=classes.device).long()]
        lbl = src_lbl[i]  # [1,H,W]
        mask = lbl.eq(chosen.view(-1, 1, 1)).sum(0, keepdim=True)  # [1,H,W] 0/1
        images.append((mask * src_img[i] + (1 - mask) * tgt_img[i]).unsqueeze(0))
        labels.append((mask * src_lbl[i] + (1 - mask) * tgt_lbl[i].unsqueeze(0)).unsqueeze(0))
        weights.append((mask * ones + (1 - mask) * tgt_weight[i]).unsqueeze(0))
        chosen_sets.append(chosen)
    return torch.cat(images), torch.cat(labels), torch.cat(weights), chosen_sets
