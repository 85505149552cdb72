"""Labels at feature resolution (method §3) and contrast preparation."""
from __future__ import annotations

import operator

import torch

from .validation import check_label_values

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_label_map(label: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if not isinstance(label, torch.Tensor):
        raise ValueError(f"label must be a torch.Tensor, got {type(label).__name__}")
    if label.dim() != 4 or label.shape[1] != 1:
        raise ValueError(f"label must be [B, 1, H, W], got shape {tuple(label.shape)}")
    if label.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"label must be an integer tensor, got dtype {label.dtype}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    check_label_values(label, num_classes, ignore_index, "label")


def downscale_label_ratio(label: torch.Tensor, scale: int, min_ratio: float = 0.75,
                          num_classes: int = 19, ignore_index: int = 255) -> torch.Tensor:
    """Majority label of every s x s window, or ignore when the majority is too weak.

    Same result as upstream's "ignore -> channel C, one-hot to C+1 channels, average
    pool (kernel = stride = s), arg-max and its fraction": the output is the arg-max
    class (lowest id on ties, the ignore channel C counting as the highest id) unless
    that is the ignore channel or its fraction count/s^2 < ``min_ratio``, where it is
    ``ignore_index``. Instead of a (C+1) x H x W one-hot map it scatter-adds one count
    per pixel into a [B*H/s*W/s, C+1] histogram. [B,1,H,W] -> [B,1,H//s,W//s] int64:
    as average pooling, trailing rows/columns that do not fill an s x s window are dropped.
    """
    _check_label_map(label, num_classes, ignore_index)
    return _downscale_checked(label, scale, min_ratio, num_classes, ignore_index)


def _downscale_checked(label: torch.Tensor, scale: int, min_ratio: float, num_classes: int,
                       ignore_index: int) -> torch.Tensor:
    """``downscale_label_ratio`` after its label check (the caller made it)."""
    original_scale = scale
    try:
        scale = operator.index(scale) if not isinstance(scale, bool) else None
    except TypeError:
        scale = None
    if scale is None or scale < 1:
        raise ValueError(f"scale must be a positive int, got {original_scale!r}")
    batch, _, height, width = label.shape
    if height < scale or width < scale:
        raise ValueError(f"label size {height}x{width} is smaller than one scale={scale} window")
    try:
        min_ratio = float(min_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"min_ratio must be a real number, got {min_ratio!r}") from None
    label = label.long()
    if scale == 1:
        return label.clone()

    out_h, out_w = height // scale, width // scale
    if (height, width) != (out_h * scale, out_w * scale):  # pooling floor: drop the partial windows
        label = label[:, :, :out_h * scale, :out_w * scale]
        height, width = out_h * scale, out_w * scale
    channels = num_classes + 1
    cls = torch.where(label[:, 0] == ignore_index, torch.full_like(label[:, 0], num_classes),
                      label[:, 0])
    dev = label.device
    rows = torch.arange(height, device=dev) // scale
    cols = torch.arange(width, device=dev) // scale
    window = (torch.arange(batch, device=dev)[:, None, None] * out_h + rows[None, :, None]) * out_w \
        + cols[None, None, :]
    hist = torch.zeros(batch * out_h * out_w * channels, dtype=torch.int32, device=dev)
    hist.scatter_add_(0, (window * channels + cls).reshape(-1),
                      torch.ones(label[:, 0].numel(), dtype=torch.int32, device=dev))
    hist = hist.view(batch * out_h * out_w, channels)
    top = hist.argmax(dim=1)  # documented to return the first maximum on ties
    top_count = hist.gather(1, top[:, None])[:, 0]
    # Same float32 quotient as the average pool of the one-hot map.
    fraction = top_count.float() / float(scale * scale)
    keep = (top != num_classes) & (fraction >= min_ratio)
    out = torch.where(keep, top, torch.full_like(top, ignore_index))
    return out.view(batch, 1, out_h, out_w)


def prepare_contrast(proj: torch.Tensor, label: torch.Tensor, *, min_ratio: float = 0.75,
                     num_classes: int = 19, ignore_index: int = 255):
    """Features and labels of every feature pixel, ready for the losses and ClassStats.

    ``proj [B,A,h,w]`` and ``label [B,1,H,W]`` with s = W // w (method §3) and
    H // s = h, W // s = w, i.e. the downscaled label has the feature size (trailing label
    rows/columns that do not fill an s x s window are dropped, as upstream's pooling).
    Returns ``feat [N,A]`` (N = B*h*w, pixel order b, h, w) and ``labels [N]`` int64.
    Ignore pixels are kept (label ``ignore_index``): dropping them would need a host
    sync, and every consumer skips them on the device.
    """
    if not isinstance(proj, torch.Tensor) or proj.dim() != 4:
        raise ValueError(f"proj must be a [B, A, h, w] tensor, got "
                         f"{tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(proj).__name__}")
    if not proj.is_floating_point():
        raise ValueError(f"proj must be a floating tensor, got dtype {proj.dtype}")
    _check_label_map(label, num_classes, ignore_index)
    batch, dim, h, w = proj.shape
    if label.shape[0] != batch:
        raise ValueError(f"label batch {label.shape[0]} != proj batch {batch}")
    if label.device != proj.device:
        raise ValueError(f"label is on {label.device} but proj is on {proj.device}")
    height, width = label.shape[2:]
    if w == 0 or h == 0:
        raise ValueError(f"proj has an empty spatial size {h}x{w}")
    scale = width // w
    if scale < 1 or height // scale != h or width // scale != w:
        raise ValueError(f"label size {height}x{width} does not downscale to the feature size {h}x{w}: "
                         f"with s = label width // feature width = {scale} it gives "
                         f"{height // max(scale, 1)}x{width // max(scale, 1)}")
    small = _downscale_checked(label, scale, min_ratio, num_classes, ignore_index)  # label checked above
    feat = proj.permute(0, 2, 3, 1).reshape(batch * h * w, dim)
    return feat, small.reshape(-1)
