"""ClassMix (method §6 step 8) for the whole batch at once, without host syncs.

Upstream loops over the samples, takes ``torch.unique`` of the *whole* source label batch
for every sample (quirk: the class set is shared by the batch and may contain the ignore
label 255), picks half of it (rounded up) with ``np.random.choice`` and mixes sample by
sample. Here :func:`choose_mix_classes` makes the same choice for every sample in a few
batched ops, and :func:`classmix` mixes the batch in one pass:

    mask[b,y,x]  = mix_classes[b, src_lbl[b,y,x]]        (labels outside 0..255: never mixed)
    mixed_img    = mask·src_img + (1−mask)·tgt_img
    mixed_lbl    = mask·src_lbl + (1−mask)·tgt_lbl
    mixed_weight = mask·1       + (1−mask)·tgt_weight

The mask is binary, so the products are computed as a select (``torch.where``); both are
equal for finite inputs, and the select keeps a NaN/inf on the unused side from leaking in.
"""
from __future__ import annotations

import torch

from ..dispatch import resolve_impl
from . import _validate

__all__ = ["classmix", "choose_mix_classes", "mix_mask"]

TABLE_SIZE = 256  # label values 0..255 (255 = ignore, which may be a chosen class)


def _as_label_map(name: str, t: torch.Tensor, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    """[B,1,H,W] view of a [B,1,H,W] or [B,H,W] tensor, with a clear error otherwise."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if tuple(t.shape) != (batch, 1, *hw):
        raise ValueError(f"{name} must be [B,1,H,W] (or [B,H,W]) = {(batch, 1, *hw)}, "
                         f"got {tuple(t.shape)}")
    return t


def choose_mix_classes(src_lbl: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B,256] bool: for each sample a uniformly random half (rounded up) of the label values
    present anywhere in the source batch (255 included when present — upstream quirk).

    Each sample gets independent random keys over the 256 values; absent values get a key
    above every present one, and the ceil(n/2) smallest keys are chosen (a uniform random
    subset, as ``np.random.choice(n, ceil(n/2), replace=False)``). Label values outside
    0..255 are not classes and are never chosen.
    """
    _validate.integer_tensor("src_lbl", src_lbl, ndim=(3, 4))
    batch, device = src_lbl.shape[0], src_lbl.device
    _validate.generator_on(generator, device)
    flat = src_lbl.reshape(-1).long()
    in_table = (flat >= 0) & (flat < TABLE_SIZE)
    # Slot TABLE_SIZE collects out-of-table values and is dropped.
    slot = torch.where(in_table, flat, TABLE_SIZE)
    present = torch.zeros(TABLE_SIZE + 1, dtype=torch.bool, device=device)
    present = present.scatter(0, slot, True)[:TABLE_SIZE]
    num_chosen = (present.sum() + 1) // 2  # 0-d tensor on the device: ceil(n / 2)
    keys = torch.rand(batch, TABLE_SIZE, generator=generator, device=device)
    keys = torch.where(present, keys, 2.0)  # absent values sort after all present ones
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(TABLE_SIZE, device=device).expand(batch, -1))
    return (ranks < num_chosen) & present


def mix_mask(src_lbl: torch.Tensor, mix_classes: torch.Tensor) -> torch.Tensor:
    """mask[b,...] = mix_classes[b, src_lbl[b,...]] (False for labels outside 0..255)."""
    batch = src_lbl.shape[0]
    flat = src_lbl.reshape(batch, -1).long()
    in_table = (flat >= 0) & (flat < TABLE_SIZE)
    chosen = mix_classes.gather(1, flat.clamp(0, TABLE_SIZE - 1))
    return (chosen & in_table).view(src_lbl.shape)


def classmix(src_img: torch.Tensor, tgt_img: torch.Tensor, src_lbl: torch.Tensor,
             tgt_lbl: torch.Tensor, tgt_weight: torch.Tensor, mix_classes: torch.Tensor, *,
             impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed image [B,C,H,W], label [B,1,H,W] int64 and pixel weight [B,1,H,W] (see module doc).

    src_img/tgt_img: same shape and floating dtype; src_lbl/tgt_lbl: integer [B,1,H,W] or
    [B,H,W]; tgt_weight: floating [B,1,H,W] or [B,H,W]; mix_classes: bool [B,256] (from
    :func:`choose_mix_classes`). impl: None | "torch" | "cuda".
    """
    _validate.float_tensor("src_img", src_img, ndim=4)
    _validate.float_tensor("tgt_img", tgt_img, ndim=4)
    if tgt_img.shape != src_img.shape or tgt_img.dtype != src_img.dtype:
        raise ValueError(f"tgt_img must match src_img in shape and dtype: {tuple(src_img.shape)} "
                         f"{src_img.dtype} vs {tuple(tgt_img.shape)} {tgt_img.dtype}")
    batch, hw = src_img.shape[0], tuple(src_img.shape[-2:])
    src_lbl = _as_label_map("src_lbl", _validate.integer_tensor("src_lbl", src_lbl, ndim=(3, 4)),
                            batch, hw)
    tgt_lbl = _as_label_map("tgt_lbl", _validate.integer_tensor("tgt_lbl", tgt_lbl, ndim=(3, 4)),
                            batch, hw)
    tgt_weight = _as_label_map(
        "tgt_weight", _validate.float_tensor("tgt_weight", tgt_weight, ndim=(3, 4)), batch, hw)
    _validate.tensor("mix_classes", mix_classes, ndim=2, dtypes=(torch.bool,))
    if tuple(mix_classes.shape) != (batch, TABLE_SIZE):
        raise ValueError(f"mix_classes must be bool [B,256] = {(batch, TABLE_SIZE)}, "
                         f"got {tuple(mix_classes.shape)}")
    _validate.same_device(src_img=src_img, tgt_img=tgt_img, src_lbl=src_lbl, tgt_lbl=tgt_lbl,
                          tgt_weight=tgt_weight, mix_classes=mix_classes)

    chosen = resolve_impl("classmix", impl, src_img.device)
    # float64 images or weights stay on torch: the kernel takes fp32/16-bit images and an
    # fp32 weight, and rounding a float64 weight through fp32 would change its values
    if chosen == "cuda" and torch.float64 not in (src_img.dtype, tgt_weight.dtype):
        mixed_img, mixed_lbl, mixed_weight = torch.ops.sepico_fast.classmix(
            src_img.contiguous(), tgt_img.contiguous(), src_lbl.long().contiguous(),
            tgt_lbl.long().contiguous(), tgt_weight.float().contiguous(), mix_classes.contiguous())
        return mixed_img, mixed_lbl, mixed_weight.to(tgt_weight.dtype)
    mask = mix_mask(src_lbl, mix_classes)  # [B,1,H,W]
    mixed_img = torch.where(mask, src_img, tgt_img)
    mixed_lbl = torch.where(mask, src_lbl.long(), tgt_lbl.long())
    mixed_weight = torch.where(mask, torch.ones((), dtype=tgt_weight.dtype, device=tgt_weight.device),
                               tgt_weight)
    return mixed_img, mixed_lbl, mixed_weight
