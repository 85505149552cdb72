"""Argument checks shared by the ops (shapes, dtypes and devices only: no host syncs)."""
from __future__ import annotations

from typing import Sequence

import torch

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pair(name: str, value: Sequence[int] | int) -> tuple[int, int]:
    """(h, w) from an int or a pair of positive ints."""
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints (h, w), got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None,
           dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, "
                         f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def integer_tensor(name: str, t, *, ndim=None) -> torch.Tensor:
    return tensor(name, t, ndim=ndim, dtypes=_INT_DTYPES)


def float_tensor(name: str, t, *, ndim=None) -> torch.Tensor:
    return tensor(name, t, ndim=ndim, dtypes=_FLOAT_DTYPES)


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def crop_fits(crop_hw: tuple[int, int], image_hw: tuple[int, int]) -> None:
    if crop_hw[0] > image_hw[0] or crop_hw[1] > image_hw[1]:
        raise ValueError(f"crop_hw {crop_hw} must fit inside the image (H, W) = {image_hw}")


def generator_on(generator: torch.Generator | None, device: torch.device | str) -> None:
    """A generator must live on the device it draws for (torch would fail less clearly)."""
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but the values are drawn on "
                         f"{torch.device(device)}; pass a generator created on that device")
