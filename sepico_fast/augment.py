"""Strong augmentation of method §6.4, batched on the device: colour jitter then Gaussian blur.

Images come in ImageNet-normalised (mean/std on the 0..255 scale). Jitter works on the
de-normalised 0..1 image with per-image factors (s = strength), clamping to [0, 1] after
each op:

    0 brightness  x ← x + δ,            δ ~ U(−s, s)          (additive, as kornia 0.5)
    1 contrast    x ← x · c,            c ~ U(1−s, 1+s)
    2 saturation  S ← S · a  in HSV,    a ~ U(1−s, 1+s)
    3 hue         H ← H + h  in HSV,    h ~ U(−s, s) of a full turn

applied in a random order, as kornia 0.5.8's ``ColorJitter``: a fresh permutation of the
four ops on each call (one for the source batch, one for the target batch, one per mixed
sample, since upstream augments every mixed sample separately). ``order=(0, 1, 2, 3)``
is the fixed order of earlier versions. As in kornia 0.5.8, saturation and hue each make
their own fp32 RGB→HSV→RGB round trip, and RGB→HSV divides by max + 1e-6.

``fused=True`` (training flag ``--fused-jitter``, off by default) is a deviation for speed:
saturation and hue next to each other in the order share one HSV round trip (they touch
different HSV channels, so either order gives the same image up to rounding; measured
≤ 1.1e-5 apart in normalised units).

Blur: separable Gaussian with σ ~ U(0.15, 1.15) shared by the images of one call (one σ
per image for the mixed batch), odd kernel size k = the largest odd number ≤
ceil(0.1 · side) per axis, reflect padding, on the normalised image.

Randomness without host syncs (``strong_augment``): whether jitter / blur happen at all
is decided once per iteration on the host (``draw_strong_params``), and so is the op order
(a host draw that only steers Python control flow); the jitter factors and σ are drawn on
the device from the iteration's generator. Constants (ImageNet mean/std, the HSV sector
table) are built once per device (``device_constants``). No Python loop over pixels; the
mixed batch is jittered image by image only when its samples' orders differ.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
FIXED_ORDER = (0, 1, 2, 3)
BLUR_SIGMA = (0.15, 1.15)
# Per HSV sector (0..5) the sources of (r, g, b) among (v, q, p, t):
# (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
_HSV_SECTORS = ((0, 3, 2), (1, 0, 2), (2, 0, 3), (2, 1, 0), (3, 2, 0), (0, 2, 1))


@dataclass(frozen=True)
class StrongParams:
    """Per-iteration decisions (drawn once, method §6.4)."""
    jitter: bool
    blur: bool
    strength: float = 0.2


def draw_strong_params(rng: random.Random, strength: float = 0.2, jitter_p: float = 0.2,
                       blur: bool = True) -> StrongParams:
    """u, u' ~ U(0,1) on the host: jitter when u > p, blur when u' > 0.5."""
    u_jitter = rng.random()
    u_blur = rng.random() if blur else 0.0
    return StrongParams(jitter=u_jitter > jitter_p, blur=u_blur > 0.5, strength=strength)


def draw_jitter_order(rng: random.Random) -> tuple[int, int, int, int]:
    """A uniformly random permutation of the four jitter ops (indices into JITTER_OPS)."""
    return tuple(rng.sample(range(4), 4))


@functools.lru_cache(maxsize=None)
def device_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [1,3,1,1], std [1,3,1,1], HSV sector table [6,3] int64) on ``device``.

    Built once per device: a tensor from Python data is a host→device copy on CUDA, which
    would otherwise happen (and synchronise) on every call.
    """
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable anywhere
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        table = torch.tensor(_HSV_SECTORS, dtype=torch.int64, device=device)
    return mean, std, table


def _mean_std(img: torch.Tensor):
    mean, std, _ = device_constants(img.device)
    return mean, std


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Normalised ``[B,3,H,W]`` (``(x − mean) / std`` of 0..255 RGB) -> float32 RGB in [0, 1]
    (``x / 255``): the inverse of ``data.transforms.normalize``, undone by :func:`renormalize`.
    The package's only denormalisation (colour jitter, debug pictures)."""
    mean, std = _mean_std(img)
    return (img.float() * std + mean) / 255.0


def renormalize(img01: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(img01)
    return (img01 * 255.0 - mean) / std


RGB_TO_HSV_EPS = 1e-6  # kornia 0.5.8's rgb_to_hsv: S = (max - min) / (max + eps)


def rgb_to_hsv(rgb: torch.Tensor, eps: float = RGB_TO_HSV_EPS) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> HSV with H in [0,1) turns (kornia: radians, the same angle)."""
    maxc, argmax = rgb.max(dim=1)
    minc = rgb.min(dim=1).values
    delta = maxc - minc
    sat = delta / (maxc + eps)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = rgb.unbind(dim=1)
    hue = torch.where(argmax == 0, (g - b) / safe,
                      torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.remainder(hue / 6.0, 1.0)
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    return torch.stack((hue, sat, maxc), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(dim=1)
    h6 = torch.remainder(h, 1.0) * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    idx = sector.long().remainder(6)  # [B,H,W]
    cand = torch.stack((v, q, p, t), dim=1)  # [B,4,H,W]
    table = device_constants(hsv.device)[2]
    pick = table[idx].permute(0, 3, 1, 2)  # [B,3,H,W] indices into cand (_HSV_SECTORS)
    return torch.gather(cand, 1, pick)


def _check_order(order) -> tuple[int, ...]:
    order = tuple(int(k) for k in order)
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"order must be a permutation of (0, 1, 2, 3) = {JITTER_OPS}, got {order}")
    return order


def _brightness(x: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    return (x + (2.0 * u[:, 0] - 1.0) * s).clamp(0.0, 1.0)


def _contrast(x: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    return (x * (1.0 - s + 2.0 * s * u[:, 1])).clamp(0.0, 1.0)


def _hsv_ops(hsv: torch.Tensor, u: torch.Tensor, s: float, ops: set[int]) -> torch.Tensor:
    """Saturation (2) and/or hue (3) applied to ``hsv`` [B,3,H,W], back to RGB in [0, 1]."""
    hue, sat = hsv[:, 0:1], hsv[:, 1:2]
    if 2 in ops:
        sat = (sat * (1.0 - s + 2.0 * s * u[:, 2])).clamp(0.0, 1.0)
    if 3 in ops:
        hue = torch.remainder(hue + (2.0 * u[:, 3] - 1.0) * s, 1.0)
    return hsv_to_rgb(torch.cat((hue, sat, hsv[:, 2:3]), dim=1)).clamp(0.0, 1.0)


def _jitter_in_order(x: torch.Tensor, u: torch.Tensor, s: float, order: tuple[int, ...],
                     fused: bool = False) -> torch.Tensor:
    """The four ops on x [B,3,H,W] in ``order``; u [B,4,1,1,1] the U(0,1) draws.

    Saturation and hue: one HSV round trip each, or (``fused``) one shared by the two when
    they are adjacent in ``order``."""
    i = 0
    while i < len(order):
        op = order[i]
        if op == 0:
            x = _brightness(x, u, s)
        elif op == 1:
            x = _contrast(x, u, s)
        else:  # saturation / hue in HSV; with ``fused`` the other one too when it comes next
            ops = {op}
            if fused and i + 1 < len(order) and order[i + 1] in (2, 3):
                ops.add(order[i + 1])
                i += 1
            x = _hsv_ops(rgb_to_hsv(x), u, s, ops)
        i += 1
    return x


def color_jitter(img01: torch.Tensor, strength: float, generator: torch.Generator | None = None,
                 factors: torch.Tensor | None = None,
                 order: Sequence[int] | Sequence[Sequence[int]] = FIXED_ORDER,
                 fused: bool = False) -> torch.Tensor:
    """Jitter a [B,3,H,W] 0..1 batch.

    ``factors`` [B,4] (U(0,1) draws, columns in JITTER_OPS order) are drawn on the
    device from ``generator`` unless given. ``order``: one permutation of (0, 1, 2, 3)
    for the batch, or one per image. ``fused``: adjacent saturation and hue share one
    HSV round trip (a deviation from kornia, see the module docstring).
    """
    b = img01.shape[0]
    per_image = len(order) > 0 and not isinstance(order[0], int)
    orders = [_check_order(o) for o in order] if per_image else [_check_order(order)]
    if per_image and len(orders) != b:
        raise ValueError(f"order: expected one permutation per image ({b}), got {len(orders)}")
    if factors is None:
        factors = torch.rand(b, 4, generator=generator, device=img01.device)
    u = factors.to(torch.float32).view(b, 4, 1, 1, 1)
    x = img01.float()
    if len(set(orders)) == 1:
        return _jitter_in_order(x, u, strength, orders[0], fused)
    return torch.cat([_jitter_in_order(x[i:i + 1], u[i:i + 1], strength, o, fused)
                      for i, o in enumerate(orders)])


def blur_kernel_size(side: int) -> int:
    k = math.ceil(0.1 * side)
    return k if k % 2 == 1 else max(1, k - 1)


def _gauss_1d(k: int, sigma: torch.Tensor) -> torch.Tensor:
    """[n] sigmas -> [n,k] normalised kernels."""
    x = torch.arange(k, dtype=torch.float32, device=sigma.device) - (k - 1) / 2.0
    w = torch.exp(-(x.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1) ** 2))
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(img: torch.Tensor, sigma) -> torch.Tensor:
    """Separable blur of [B,C,H,W]; ``sigma`` a float (whole batch), a [B] sequence, or a
    [1] / [B] tensor (a tensor on the image's device is used as is: no host copy)."""
    b, c, h, w = img.shape
    ky, kx = blur_kernel_size(h), blur_kernel_size(w)
    if isinstance(sigma, torch.Tensor):
        sig = sigma.to(img.device, torch.float32).reshape(-1)
    else:
        sig = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).to(img.device)
    if sig.numel() == 1:
        sig = sig.expand(b)
    x = img.float().reshape(1, b * c, h, w)
    if ky > 1:
        wy = _gauss_1d(ky, sig).repeat_interleave(c, dim=0).view(b * c, 1, ky, 1)
        x = F.conv2d(F.pad(x, (0, 0, ky // 2, ky // 2), mode="reflect"), wy, groups=b * c)
    if kx > 1:
        wx = _gauss_1d(kx, sig).repeat_interleave(c, dim=0).view(b * c, 1, 1, kx)
        x = F.conv2d(F.pad(x, (kx // 2, kx // 2, 0, 0), mode="reflect"), wx, groups=b * c)
    return x.view(b, c, h, w).to(img.dtype)


def strong_augment(img: torch.Tensor, params: StrongParams, rng: random.Random,
                   generator: torch.Generator | None = None, per_image: bool = False,
                   fused_jitter: bool = False) -> torch.Tensor:
    """Jitter (if params.jitter) then blur (if params.blur) a normalised batch.

    One jitter order (from ``rng``, the host) and one σ for the call, or one each per
    image when ``per_image`` (mixed samples). Draws, in this order: the order(s) from
    ``rng``; the jitter factors [B,4] and then σ ~ U(0.15, 1.15) [1 or B] from
    ``generator`` on the image's device (no host→device copy). ``fused_jitter``: see
    :func:`color_jitter`'s ``fused``.
    """
    out = img
    n = img.shape[0] if per_image else 1
    if params.jitter:
        orders = [draw_jitter_order(rng) for _ in range(n)]
        jittered = color_jitter(denormalize(out), params.strength, generator,
                                order=orders if per_image else orders[0], fused=fused_jitter)
        out = renormalize(jittered).to(img.dtype)
    if params.blur:
        lo, hi = BLUR_SIGMA
        sigma = lo + (hi - lo) * torch.rand(n, generator=generator, device=img.device)
        out = gaussian_blur(out, sigma)
    return out


# ----------------------------------------------------------------------------------------
# Branch-free strong augmentation (method §6.4), the same maths as strong_augment
# ----------------------------------------------------------------------------------------
def _jitter_candidates(x: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """[B,4,3,H,W]: each of the four jitter ops applied to x (one HSV round trip each)."""
    hsv = rgb_to_hsv(x)  # one conversion serves both HSV candidates
    return torch.stack((_brightness(x, u, s), _contrast(x, u, s), _hsv_ops(hsv, u, s, {2}), _hsv_ops(hsv, u, s, {3})),
                       dim=1)


def static_jitter(img01: torch.Tensor, strength: float, factors: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Jitter with the op order of each image given as data: ``orders`` [1 or B, 4] int64.

    At each of the four positions every op is computed and the drawn one is selected with
    ``gather`` (an exact copy), so the op sequence is the same for every order."""
    b = img01.shape[0]
    u = factors.to(torch.float32).view(b, 4, 1, 1, 1)
    x = img01.float()
    orders = orders.expand(b, 4)
    for pos in range(4):
        cand = _jitter_candidates(x, u, strength)  # [B,4,3,H,W]
        pick = orders[:, pos].view(b, 1, 1, 1, 1).expand(b, 1, *cand.shape[2:])
        x = cand.gather(1, pick)[:, 0]
    return x


def static_augment(img: torch.Tensor, static, orders: torch.Tensor, strength: float,
                   blur: bool, per_image: bool = False) -> torch.Tensor:
    """``strong_augment`` with its decisions on the device: jitter and blur always
    computed, kept where ``static.flags`` say so. ``static``: the graph-ready step's inputs (``train/graphs.py``: ``.generator``,
    ``.flags``). Draws from ``static.generator``: the
    factors [B,4], then σ [1 or B]."""
    gen = static.generator
    b = img.shape[0]
    factors = torch.rand(b, 4, generator=gen, device=img.device)
    jittered = renormalize(static_jitter(denormalize(img), strength, factors, orders)).to(img.dtype)
    out = torch.where(static.flags[0], jittered, img)
    if blur:  # cfg.blur: a setting, not a per-iteration draw
        lo, hi = BLUR_SIGMA
        sigma = lo + (hi - lo) * torch.rand(b if per_image else 1, generator=gen, device=img.device)
        out = torch.where(static.flags[1], gaussian_blur(out, sigma), out)
    return out
