"""Per-sample training/evaluation transforms of method §1, split into *plan* and *render*.

A plan holds every random decision of one sample (file, crop window, flip); it is drawn
on the host from an explicit ``numpy.random.Generator`` so that the PyTorch and the DALI
pipelines render exactly the same samples. Rendering is deterministic:

* resize to fit ``scale = (long, short)`` keeping the aspect ratio, as mmcv's
  ``imrescale``: factor s = min(long / max(h, w), short / min(h, w)), new size
  ``int(w·s + 0.5) × int(h·s + 0.5)`` (GTA 1914×1052 → 1280×704);
* images: bilinear with half-pixel centres and no anti-aliasing (OpenCV's INTER_LINEAR),
  rounded back to uint8 (mmseg resizes uint8 images) before normalising;
* labels: nearest neighbour, source index ``floor(dst · in / out)`` (OpenCV's INTER_NEAREST);
* crop → horizontal flip → normalise with the ImageNet mean/std → pad to the crop size
  (image 0, label 255).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX, MEAN, STD

MAX_CROP_REDRAWS = 10  # mmseg RandomCrop: up to 10 re-draws while one class dominates


def fit_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) of an image resized to fit ``scale`` keeping its aspect ratio (mmcv semantics)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size: expected positive height/width, got {height}x{width}")
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output position for nearest-neighbour resizing: floor(i · in / out)."""
    idx = (np.arange(out_size, dtype=np.int64) * in_size) // out_size
    return np.minimum(idx, in_size - 1)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a ``[H, W]`` label map to ``size = (h, w)``."""
    h, w = label.shape[:2]
    if (h, w) == tuple(size):
        return label
    return label[nearest_indices(h, size[0])[:, None], nearest_indices(w, size[1])[None, :]]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 ``[H, W, 3]`` image to uint8 ``[h, w, 3]`` (rounded half up)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected a uint8 numpy array [H, W, 3], got "
                         f"{getattr(image, 'dtype', type(image))} {list(getattr(image, 'shape', []))}")
    if tuple(image.shape[:2]) == tuple(size):
        return image
    # The HWC array seen as NCHW with channels-last strides: no transposing copy, and
    # upsample_bilinear2d has a channels-last kernel.
    x = torch.from_numpy(np.ascontiguousarray(image))[None].permute(0, 3, 1, 2).float()
    out = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    out = torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)
    return out[0].permute(1, 2, 0).contiguous().numpy()


_MEAN = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
# (v − mean_c) / std_c for every uint8 value v, computed with the same float32 operations as
# the tensor formula, so that normalising through the table is bit-identical to it.
_NORM_LUT = ((torch.arange(256, dtype=torch.float32)[None, :] - _MEAN.view(3, 1)) / _STD.view(3, 1)).numpy()


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` RGB → float32 ``[3, H, W]`` tensor ``(x − mean) / std``.

    The inverse is ``sepico_fast.augment.denormalize`` (to RGB in [0, 1])."""
    out = np.empty((3,) + image.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(_NORM_LUT[c], image[..., c], out=out[c])
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- crops

@dataclass(frozen=True)
class CropWindow:
    y0: int
    x0: int
    h: int
    w: int


def random_crop_window(rng: np.random.Generator, height: int, width: int,
                       crop: tuple[int, int]) -> CropWindow:
    """Uniform crop offset as mmseg's RandomCrop; the window shrinks to the image when smaller."""
    y0 = int(rng.integers(0, max(height - crop[0], 0) + 1))
    x0 = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return CropWindow(y0, x0, min(crop[0], height), min(crop[1], width))


def crop_is_balanced(label_crop: np.ndarray, cat_max_ratio: float) -> bool:
    """True when at least two classes occur and the largest covers < cat_max_ratio of labelled pixels."""
    counts = np.bincount(label_crop.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return counts.size > 1 and counts.max() < cat_max_ratio * counts.sum()


def plan_crop(rng: np.random.Generator, label: np.ndarray, crop: tuple[int, int],
              cat_max_ratio: float = 0.75) -> CropWindow:
    """mmseg RandomCrop with ``cat_max_ratio``: draw, then re-draw up to 10 times while unbalanced
    (the last re-draw is kept unchecked, as upstream)."""
    h, w = label.shape
    window = random_crop_window(rng, h, w, crop)
    if cat_max_ratio < 1.0:
        for _ in range(MAX_CROP_REDRAWS):
            if crop_is_balanced(crop_array(label, window), cat_max_ratio):
                break
            window = random_crop_window(rng, h, w, crop)
    return window


def crop_array(array, window: CropWindow):
    """Crop the last two dimensions of a numpy array or tensor."""
    return array[..., window.y0:window.y0 + window.h, window.x0:window.x0 + window.w]


def flip_draw(rng: np.random.Generator, prob: float = 0.5) -> bool:
    return bool(rng.random() < prob)


def render_source(image: np.ndarray, label: np.ndarray, resized: tuple[int, int], window: CropWindow,
                  flip: bool, crop: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize → crop → flip → normalise → pad. Returns float32 [3, ch, cw] and int64 [1, ch, cw].

    ``image`` may already be resized (then resizing is a no-op); ``label`` is the label
    resized to ``resized``.
    """
    img = crop_array(resize_image(image, resized).transpose(2, 0, 1), window).transpose(1, 2, 0)
    lbl = crop_array(label, window)
    if flip:
        img, lbl = img[:, ::-1], lbl[:, ::-1]
    img_t = normalize(img)
    lbl_t = torch.from_numpy(lbl.astype(np.int64))
    pad_h, pad_w = crop[0] - img_t.shape[1], crop[1] - img_t.shape[2]
    if pad_h > 0 or pad_w > 0:  # mmseg Pad: bottom/right, image 0 (after normalising), label 255
        img_t = F.pad(img_t, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=0.0)
        lbl_t = F.pad(lbl_t, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=IGNORE_INDEX)
    return img_t, lbl_t[None].contiguous()


def render_target(image: np.ndarray, resized: tuple[int, int], flip: bool) -> torch.Tensor:
    """Resize to fit → flip → normalise (no crop: the trainer crops on pseudo labels)."""
    img = resize_image(image, resized)
    if flip:
        img = img[:, ::-1]
    return normalize(img)
