"""Class-balanced pseudo-label crop (method §6 step 3), batched and free of host syncs.

Upstream draws a window, copies its class counts to the host, scores it and repeats ten
times per image. Here all B×K candidate windows are drawn at once
(:func:`sample_crop_offsets`), scored at once (:func:`score_crop_windows`), the best one
per image picked on the device (:func:`select_crop_windows`) and cut out with one gather
(:func:`crop_batch`)::

    offsets = sample_crop_offsets(B, 10, (H, W), (640, 640), generator=g, device=dev)
    best = select_crop_windows(pseudo_label, offsets, (640, 640))
    img_crop, lbl_crop = crop_batch(img, best, (640, 640)), crop_batch(pseudo_label, best, (640, 640))

Score of one window (n_c = pixels of class c; ignore_index and labels outside [0, C) are
not counted; T = Σ n_c; P = number of classes with n_c >= 1):

    score = Σ_{c: n_c > 1} log n_c    if P >= 2 and max_c n_c / T < cat_max_ratio
          = 0                          otherwise

"At least two classes occur" counts every class with one or more pixels (upstream's
``len(cnt) > 1`` after dropping the ignore label), while the log-sum only takes classes
with more than one pixel — both as upstream. A window of only ignore pixels scores 0.
The log-sum is accumulated in float64 and rounded to float32 once, so windows with equal
histograms tie exactly; the arg-max then keeps the first such window (upstream's strict
``score > best_score`` update starting from -1).

Offsets are clamped into the valid range [0, H−h] × [0, W−w] by every function here, so
out-of-range offsets never read outside the map (they behave like the nearest valid
window).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..dispatch import resolve_impl
from . import _validate

__all__ = ["sample_crop_offsets", "score_crop_windows", "select_crop_windows", "crop_batch"]


def sample_crop_offsets(batch: int, num_tries: int, image_hw: Sequence[int] | int,
                        crop_hw: Sequence[int] | int, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """[B,K,2] int64 window origins (y0, x0), uniform over y0 ∈ [0, H−h], x0 ∈ [0, W−w].

    Drawn on ``device`` (default: the generator's device, else CPU) with ``generator``.
    """
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    if not isinstance(num_tries, int) or num_tries < 1:
        raise ValueError(f"num_tries must be a positive int, got {num_tries!r}")
    image_hw = _validate.pair("image_hw", image_hw)
    crop_hw = _validate.pair("crop_hw", crop_hw)
    _validate.crop_fits(crop_hw, image_hw)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    _validate.generator_on(generator, device)
    size = (batch, num_tries)
    y0 = torch.randint(0, image_hw[0] - crop_hw[0] + 1, size, generator=generator, device=device)
    x0 = torch.randint(0, image_hw[1] - crop_hw[1] + 1, size, generator=generator, device=device)
    return torch.stack((y0, x0), dim=-1)


def _check_window_args(labels, offsets, crop_hw, num_classes, cat_max_ratio, ignore_index):
    _validate.integer_tensor("labels", labels, ndim=(3, 4))
    if labels.dim() == 4:
        if labels.shape[1] != 1:
            raise ValueError(f"labels must be [B,H,W] or [B,1,H,W], got {tuple(labels.shape)}")
        labels = labels[:, 0]
    _validate.integer_tensor("offsets", offsets, ndim=3)
    if offsets.shape[0] != labels.shape[0] or offsets.shape[2] != 2 or offsets.shape[1] < 1:
        raise ValueError(f"offsets must be [B,K,2] with B={labels.shape[0]} and K >= 1, "
                         f"got {tuple(offsets.shape)}")
    _validate.same_device(labels=labels, offsets=offsets)
    crop_hw = _validate.pair("crop_hw", crop_hw)
    _validate.crop_fits(crop_hw, tuple(labels.shape[-2:]))
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    cat_max_ratio = float(cat_max_ratio)
    return labels, offsets, crop_hw, cat_max_ratio


def _clamp_offsets(offsets: torch.Tensor, image_hw: tuple[int, int],
                   crop_hw: tuple[int, int]) -> torch.Tensor:
    y0 = offsets[..., 0].long().clamp(0, image_hw[0] - crop_hw[0])
    x0 = offsets[..., 1].long().clamp(0, image_hw[1] - crop_hw[1])
    return torch.stack((y0, x0), dim=-1)


def window_class_counts(labels: torch.Tensor, offsets: torch.Tensor, crop_hw: tuple[int, int],
                        num_classes: int, ignore_index: int) -> torch.Tensor:
    """[B,K,C] int64 class counts of each window, from an integral histogram.

    I[b,c,y,x] = #{(y',x') <= (y,x) : labels[b,y',x'] = c}; a window's count is the usual
    four-corner difference of I. ``offsets`` must already be clamped.
    """
    batch, height, width = labels.shape
    h, w = crop_hw
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    one_hot = labels.unsqueeze(1) == classes  # [B,C,H,W] bool; values outside [0,C) match nothing
    if 0 <= ignore_index < num_classes:
        one_hot[:, ignore_index] = False
    # int32 is exact for maps below 2^31 pixels and halves the memory of the int64 default.
    count_dtype = torch.int32 if height * width < 2**31 else torch.int64
    integral = one_hot.cumsum(2, dtype=count_dtype).cumsum_(3).view(batch, num_classes, -1)
    del one_hot

    def corner(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """I at inclusive corner (y, x) per window, 0 where y or x is -1: [B,C,K]."""
        index = (y.clamp(min=0) * width + x.clamp(min=0)).unsqueeze(1)
        values = integral.gather(2, index.expand(-1, num_classes, -1))
        return values * ((y >= 0) & (x >= 0)).unsqueeze(1)

    y0, x0 = offsets[..., 0], offsets[..., 1]
    y1, x1 = y0 + h - 1, x0 + w - 1
    counts = corner(y1, x1) - corner(y0 - 1, x1) - corner(y1, x0 - 1) + corner(y0 - 1, x0 - 1)
    return counts.transpose(1, 2).long()


def scores_from_counts(counts: torch.Tensor, cat_max_ratio: float) -> torch.Tensor:
    """[...,C] int class counts -> [...] fp32 method §6.3 scores (see module docstring)."""
    counts = counts.long()
    total = counts.sum(-1)
    largest = counts.amax(-1)
    present = (counts >= 1).sum(-1)
    log_sum = torch.where(counts > 1, counts.double().log(), 0.0).sum(-1)
    balanced = (present >= 2) & (largest.double() / total.double() < cat_max_ratio)
    return torch.where(balanced, log_sum, 0.0).float()


def _scores_and_best(labels, offsets, crop_hw, num_classes, cat_max_ratio, ignore_index, impl,
                     op):
    labels, offsets, crop_hw, cat_max_ratio = _check_window_args(
        labels, offsets, crop_hw, num_classes, cat_max_ratio, ignore_index)
    chosen = resolve_impl(op, impl, labels.device)
    if chosen == "cuda":
        if num_classes > 1024:
            raise ValueError(f"{op}: impl='cuda' supports num_classes <= 1024, got {num_classes}")
        if labels.dtype not in (torch.uint8, torch.int32, torch.int64):
            labels = labels.long()
        return torch.ops.sepico_fast.crop_window_scores(
            labels.contiguous(), offsets.long().contiguous(), crop_hw[0], crop_hw[1], num_classes,
            cat_max_ratio, ignore_index)
    clamped = _clamp_offsets(offsets, tuple(labels.shape[-2:]), crop_hw)
    counts = window_class_counts(labels, clamped, crop_hw, num_classes, ignore_index)
    scores = scores_from_counts(counts, cat_max_ratio)
    best_k = scores.argmax(dim=1)  # first maximal window on ties
    best = clamped.gather(1, best_k.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)
    return scores, best


def score_crop_windows(labels: torch.Tensor, offsets: torch.Tensor, crop_hw: Sequence[int] | int,
                       num_classes: int = 19, cat_max_ratio: float = 0.75,
                       ignore_index: int = 255, *, impl: str | None = None) -> torch.Tensor:
    """[B,K] fp32 class-balance score of each candidate window (see the module docstring).

    labels: [B,H,W] (or [B,1,H,W]) integer pseudo labels; offsets: [B,K,2] (y0, x0).
    impl: None (CUDA extension for CUDA inputs when built, else torch) | "torch" | "cuda".
    """
    scores, _ = _scores_and_best(labels, offsets, crop_hw, num_classes, cat_max_ratio,
                                 ignore_index, impl, "score_crop_windows")
    return scores


def select_crop_windows(labels: torch.Tensor, offsets: torch.Tensor, crop_hw: Sequence[int] | int,
                        num_classes: int = 19, cat_max_ratio: float = 0.75,
                        ignore_index: int = 255, *, impl: str | None = None) -> torch.Tensor:
    """[B,2] int64 origin of the best-scoring window per sample (first wins ties), clamped."""
    _, best = _scores_and_best(labels, offsets, crop_hw, num_classes, cat_max_ratio,
                               ignore_index, impl, "select_crop_windows")
    return best


def crop_batch(x: torch.Tensor, offsets: torch.Tensor, crop_hw: Sequence[int] | int) -> torch.Tensor:
    """x[B,...,H,W] -> [B,...,h,w]: sample b cut at its own origin offsets[b] = (y0, x0).

    One gather over flattened pixel indices (any dtype, any number of middle dims); offsets
    are clamped into the valid range.
    """
    _validate.tensor("x", x)
    if x.dim() < 3:
        raise ValueError(f"x must be [B,...,H,W] with at least 3 dimensions, got {tuple(x.shape)}")
    _validate.integer_tensor("offsets", offsets, ndim=2)
    if offsets.shape != (x.shape[0], 2):
        raise ValueError(f"offsets must be [B,2] with B={x.shape[0]}, got {tuple(offsets.shape)}")
    _validate.same_device(x=x, offsets=offsets)
    crop_hw = _validate.pair("crop_hw", crop_hw)
    height, width = x.shape[-2:]
    _validate.crop_fits(crop_hw, (height, width))
    h, w = crop_hw
    origin = _clamp_offsets(offsets, (height, width), crop_hw)
    rows = origin[:, :1] + torch.arange(h, device=x.device)  # [B,h]
    cols = origin[:, 1:] + torch.arange(w, device=x.device)  # [B,w]
    index = (rows.unsqueeze(2) * width + cols.unsqueeze(1)).view(x.shape[0], 1, h * w)
    flat = x.reshape(x.shape[0], -1, height * width)
    out = flat.gather(2, index.expand(-1, flat.shape[1], -1))
    return out.view(*x.shape[:-2], h, w)
