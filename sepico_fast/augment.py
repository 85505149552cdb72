"""Strong augmentation of SPEC §6.4, batched on the device: colour jitter then Gaussian blur.

Images come in ImageNet-normalised (mean/std on the 0..255 scale). Jitter works on the
de-normalised 0..1 image, in the fixed order brightness → contrast → saturation → hue,
clamping to [0, 1] after each op, with per-image factors (s = strength):

    brightness  x ← x + δ,            δ ~ U(−s, s)          (additive, as kornia 0.5)
    contrast    x ← x · c,            c ~ U(1−s, 1+s)
    saturation  S ← S · a  in HSV,    a ~ U(1−s, 1+s)
    hue         H ← H + h  in HSV,    h ~ U(−s, s) of a full turn

Blur: separable Gaussian with σ shared by the images of one call (or one σ per image for
the mixed batch, upstream blurs each mixed sample separately), odd kernel size
k = the largest odd number ≤ ceil(0.1 · side) per axis, reflect padding, on the
normalised image. Whether jitter / blur happen at all is decided by the caller once per
iteration (``draw_strong_params``). No Python loop over images or pixels.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class StrongParams:
    """Per-iteration decisions (drawn once, SPEC §6.4)."""
    jitter: bool
    blur: bool
    strength: float = 0.2


def draw_strong_params(rng: random.Random, strength: float = 0.2, jitter_p: float = 0.2,
                       blur: bool = True) -> StrongParams:
    """u, u' ~ U(0,1) on the host: jitter when u > p, blur when u' > 0.5."""
    u_jitter = rng.random()
    u_blur = rng.random() if blur else 0.0
    return StrongParams(jitter=u_jitter > jitter_p, blur=u_blur > 0.5, strength=strength)


def _mean_std(img: torch.Tensor):
    mean = torch.tensor(IMAGENET_MEAN, device=img.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def denormalize(img: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(img)
    return (img.float() * std + mean) / 255.0


def renormalize(img01: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(img01)
    return (img01 * 255.0 - mean) / std


def rgb_to_hsv(rgb: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> HSV with H in [0,1) turns."""
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
    idx = sector.long().remainder(6).unsqueeze(1)  # [B,1,H,W]
    # Per sector (0..5) the (r, g, b) sources: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    cand = torch.stack((v, q, p, t), dim=1)  # [B,4,H,W]
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]],
                         device=hsv.device)
    pick = table[idx.squeeze(1)].permute(0, 3, 1, 2)  # [B,3,H,W] indices into cand
    return torch.gather(cand, 1, pick)


def color_jitter(img01: torch.Tensor, strength: float, generator: torch.Generator | None = None,
                 factors: torch.Tensor | None = None) -> torch.Tensor:
    """Jitter a [B,3,H,W] 0..1 batch; ``factors`` [B,4] (U(0,1) draws) may be given for tests."""
    b = img01.shape[0]
    if factors is None:
        factors = torch.rand(b, 4, generator=generator, device=img01.device)
    u = factors.to(img01.device, torch.float32).view(b, 4, 1, 1, 1)
    s = strength
    x = img01.float()
    x = (x + (2.0 * u[:, 0] - 1.0) * s).clamp(0.0, 1.0)                 # brightness
    x = (x * (1.0 - s + 2.0 * s * u[:, 1])).clamp(0.0, 1.0)             # contrast
    hsv = rgb_to_hsv(x)
    sat = (hsv[:, 1:2] * (1.0 - s + 2.0 * s * u[:, 2])).clamp(0.0, 1.0)  # saturation
    hue = torch.remainder(hsv[:, 0:1] + (2.0 * u[:, 3] - 1.0) * s, 1.0)  # hue
    x = hsv_to_rgb(torch.cat((hue, sat, hsv[:, 2:3]), dim=1)).clamp(0.0, 1.0)
    return x


def blur_kernel_size(side: int) -> int:
    k = math.ceil(0.1 * side)
    return k if k % 2 == 1 else max(1, k - 1)


def _gauss_1d(k: int, sigma: torch.Tensor) -> torch.Tensor:
    """[n] sigmas -> [n,k] normalised kernels."""
    x = torch.arange(k, dtype=torch.float32, device=sigma.device) - (k - 1) / 2.0
    w = torch.exp(-(x.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1) ** 2))
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(img: torch.Tensor, sigma) -> torch.Tensor:
    """Separable blur of [B,C,H,W]; ``sigma`` a float (whole batch) or a [B] sequence."""
    b, c, h, w = img.shape
    ky, kx = blur_kernel_size(h), blur_kernel_size(w)
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
                   generator: torch.Generator | None = None, per_image_sigma: bool = False) -> torch.Tensor:
    """Jitter (if params.jitter) then blur (if params.blur) a normalised batch.

    The blur σ ~ U(0.15, 1.15) is drawn on the host from ``rng``: once for the call, or
    once per image when ``per_image_sigma`` (mixed samples). Jitter factors come from
    ``generator`` on the device.
    """
    out = img
    if params.jitter:
        out = renormalize(color_jitter(denormalize(out), params.strength, generator)).to(img.dtype)
    if params.blur:
        n = img.shape[0] if per_image_sigma else 1
        sigmas = [rng.uniform(0.15, 1.15) for _ in range(n)]
        out = gaussian_blur(out, sigmas)
    return out
