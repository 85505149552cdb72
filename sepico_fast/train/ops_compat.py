"""The ``sepico_fast.ops`` functions the step needs, with torch fallbacks.

The trainer calls ``sepico_fast.ops`` (CUDA kernels + torch fallbacks, ARCHITECTURE.md);
while that layer is missing from an installation, these small batched torch versions
of the same contracts stand in (same signatures and semantics, SPEC §6.3 / §6.8).
"""
from __future__ import annotations

import torch

try:  # the real layer
    from ..ops import (choose_mix_classes, classmix, crop_batch, sample_crop_offsets,  # noqa: F401
                       select_crop_windows)
    HAVE_OPS = True
except ImportError:
    HAVE_OPS = False

if not HAVE_OPS:
    from .uda import choose_mix_classes  # noqa: F401

    def sample_crop_offsets(batch, num_tries, image_hw, crop_hw, generator=None, device=None):
        """[B,K,2] int64 (y0, x0), uniform over the valid offsets (as mmseg RandomCrop)."""
        my = max(image_hw[0] - crop_hw[0], 0) + 1
        mx = max(image_hw[1] - crop_hw[1], 0) + 1
        u = torch.rand(batch, num_tries, 2, generator=generator, device=device)
        scale = torch.tensor([my, mx], device=u.device, dtype=torch.float32)
        return (u * scale).floor().long().clamp_max(scale.long() - 1)

    def score_crop_windows(labels, offsets, crop_hw, num_classes=19, cat_max_ratio=0.75, ignore_index=255):
        """Σ_c log(count_c) over classes with count > 1 if ≥ 2 classes occur and the largest
        share of the labelled pixels is < cat_max_ratio, else 0. Integral images, no loops."""
        b, h, w = labels.shape
        onehot = torch.zeros(b, num_classes + 1, h, w, device=labels.device, dtype=torch.float32)
        lbl = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels)
        onehot.scatter_(1, lbl.unsqueeze(1), 1.0)
        onehot = onehot[:, :num_classes].double()
        integral = torch.nn.functional.pad(onehot.cumsum(2).cumsum(3), (1, 0, 1, 0))  # [B,C,H+1,W+1]
        y0, x0 = offsets[..., 0], offsets[..., 1]                                     # [B,K]
        y1, x1 = y0 + crop_hw[0], x0 + crop_hw[1]
        bidx = torch.arange(b, device=labels.device).view(b, 1)

        def at(yy, xx):  # -> [B,K,C]
            return integral[bidx, :, yy, xx]

        counts = (at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)).float()
        total = counts.sum(-1)
        present = (counts > 0).sum(-1)
        ok = (present >= 2) & (counts.amax(-1) < cat_max_ratio * total)
        score = torch.where(counts > 1, counts.clamp_min(1).log(), torch.zeros_like(counts)).sum(-1)
        return torch.where(ok, score, torch.zeros_like(score))

    def select_crop_windows(labels, offsets, crop_hw, num_classes=19, cat_max_ratio=0.75, ignore_index=255):
        score = score_crop_windows(labels, offsets, crop_hw, num_classes, cat_max_ratio, ignore_index)
        best = score.argmax(dim=1)  # first maximum wins
        return offsets.gather(1, best.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)

    def crop_batch(x, offsets, crop_hw):
        """Per-sample window of [B,...,H,W] via one gather of row and column indices."""
        h, w = crop_hw
        b = x.shape[0]
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device).view(1, h)   # [B,h]
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device).view(1, w)   # [B,w]
        lead = x.shape[1:-2]
        flat = x.reshape(b, -1, x.shape[-2], x.shape[-1])
        c = flat.shape[1]
        out = flat.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, flat.shape[-1]))
        out = out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
        return out.reshape(b, *lead, h, w)

    def classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix_classes):
        """mask = source pixels whose label is among the sample's mix classes (SPEC §6.8)."""
        b = src_lbl.shape[0]
        mask = mix_classes.gather(1, src_lbl.reshape(b, -1).long()).view_as(src_lbl)
        m = mask.to(src_img.dtype)
        mixed_img = m * src_img + (1 - m) * tgt_img
        mixed_lbl = torch.where(mask, src_lbl, tgt_lbl)
        mixed_w = torch.where(mask, torch.ones_like(tgt_weight), tgt_weight)
        return mixed_img, mixed_lbl, mixed_w
