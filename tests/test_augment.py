"""Strong augmentation (SPEC §6.4): colour jitter and Gaussian blur, batched."""
from __future__ import annotations

import colorsys
import math
import random

import pytest
import torch
import torch.nn.functional as F

from sepico_fast.augment import (StrongParams, blur_kernel_size, color_jitter, denormalize, draw_strong_params,
                                 gaussian_blur, hsv_to_rgb, renormalize, rgb_to_hsv, strong_augment)


def test_hsv_round_trip_and_colorsys():
    x = torch.rand(2, 3, 5, 6)
    hsv = rgb_to_hsv(x)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-6, rtol=0)
    for (b, i, j) in [(0, 0, 0), (1, 4, 5), (0, 2, 3)]:
        ref = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        torch.testing.assert_close(hsv[b, :, i, j], torch.tensor(ref, dtype=torch.float32), atol=1e-6, rtol=0)


def test_color_jitter_matches_colorsys_per_pixel():
    x = torch.rand(2, 3, 4, 4)
    u = torch.rand(2, 4)
    s = 0.2
    out = color_jitter(x, s, factors=u)
    for b in range(2):
        db, cf, sf, hf = (2 * u[b, 0] - 1) * s, 1 - s + 2 * s * u[b, 1], 1 - s + 2 * s * u[b, 2], (2 * u[b, 3] - 1) * s
        for i in range(4):
            for j in range(4):
                r, g, bl = (min(max(v + float(db), 0), 1) for v in x[b, :, i, j].tolist())
                r, g, bl = (min(max(v * float(cf), 0), 1) for v in (r, g, bl))
                h, sat, v = colorsys.rgb_to_hsv(r, g, bl)
                ref = colorsys.hsv_to_rgb((h + float(hf)) % 1, min(max(sat * float(sf), 0), 1), v)
                torch.testing.assert_close(out[b, :, i, j], torch.tensor(ref, dtype=torch.float32), atol=2e-6, rtol=0)


def test_jitter_factors_differ_per_image():
    x = torch.rand(1, 3, 8, 8).expand(4, 3, 8, 8).contiguous()
    out = color_jitter(x, 0.2, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1]) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("side, k", [(640, 63), (64, 7), (60, 5), (1280, 127), (5, 1), (21, 3)])
def test_blur_kernel_size_odd_about_ten_percent(side, k):
    assert blur_kernel_size(side) == k
    assert k % 2 == 1 and k <= math.ceil(0.1 * side)


def test_blur_matches_dense_kernel_and_per_image_sigma():
    x = torch.randn(2, 3, 30, 50)
    sig = [0.4, 1.1]
    out = gaussian_blur(x, sig)
    ky, kx = blur_kernel_size(30), blur_kernel_size(50)
    for b in range(2):
        gy = torch.tensor([math.exp(-((i - (ky - 1) / 2) ** 2) / (2 * sig[b] ** 2)) for i in range(ky)])
        gx = torch.tensor([math.exp(-((i - (kx - 1) / 2) ** 2) / (2 * sig[b] ** 2)) for i in range(kx)])
        k2 = torch.outer(gy / gy.sum(), gx / gx.sum()).expand(3, 1, ky, kx).contiguous()
        ref = F.conv2d(F.pad(x[b:b + 1], (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect"), k2, groups=3)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)
    one = gaussian_blur(x, 0.7)
    torch.testing.assert_close(one, gaussian_blur(x, [0.7, 0.7]))


def test_strong_augment_decisions():
    x = torch.randn(2, 3, 16, 16)
    rng = random.Random(0)
    assert torch.equal(strong_augment(x, StrongParams(False, False), rng), x)
    torch.testing.assert_close(renormalize(denormalize(x)), x, atol=1e-4, rtol=1e-5)
    p = draw_strong_params(random.Random(1), 0.2, 0.2, True)
    r = random.Random(1)
    assert p.jitter == (r.random() > 0.2) and p.blur == (r.random() > 0.5)
    assert not draw_strong_params(random.Random(1), blur=False).blur
    y = strong_augment(x, StrongParams(True, True), random.Random(0), torch.Generator().manual_seed(0),
                       per_image_sigma=True)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(y, x)
