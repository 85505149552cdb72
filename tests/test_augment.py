"""Strong augmentation (method §6.4): colour jitter and Gaussian blur, batched.

References: colorsys pixel by pixel, and kornia 0.5.8's ColorJitter written out op by op
(radians, eps 1e-6, one HSV round trip per op) at the end of this file.
"""
from __future__ import annotations

import colorsys
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from sepico_fast.augment import (
    StrongParams,
    blur_kernel_size,
    color_jitter,
    denormalize,
    draw_jitter_order,
    draw_strong_params,
    gaussian_blur,
    hsv_to_rgb,
    renormalize,
    rgb_to_hsv,
    strong_augment,
)


def test_denormalize_inverts_the_data_normalisation_to_unit_range():
    """The one denormalisation: normalised images (data.transforms.normalize of 0..255
    uint8 RGB) back to RGB / 255 in [0, 1]."""
    import numpy as np

    from sepico_fast.data.transforms import normalize

    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgb01 = denormalize(normalize(image)[None])
    assert rgb01.shape == (1, 3, 5, 7) and rgb01.dtype == torch.float32
    expected = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    torch.testing.assert_close(rgb01, expected, atol=1e-6, rtol=0)


def test_hsv_round_trip_and_colorsys():
    x = torch.rand(2, 3, 5, 6)
    hsv = rgb_to_hsv(x)
    # S = (max - min) / (max + 1e-6) (kornia 0.5.8): the round trip lifts the minimum by
    # (max - min) * 1e-6 / (max + 1e-6) <= 1e-6, plus float rounding
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=2e-6, rtol=0)
    for (b, i, j) in [(0, 0, 0), (1, 4, 5), (0, 2, 3)]:
        h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        ref = (h, s * v / (v + 1e-6), v)
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
                # two HSV round trips, each off colorsys by <= 1e-6 (eps) plus rounding
                torch.testing.assert_close(out[b, :, i, j], torch.tensor(ref, dtype=torch.float32), atol=4e-6, rtol=0)


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
                       per_image=True)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(y, x)


# ---------------------------------------------------------------------------------------
# Jitter order (method §6.4): a fresh permutation of the four ops on each call
# ---------------------------------------------------------------------------------------
def _clamp01(v):
    return min(max(v, 0.0), 1.0)


def ref_jitter_pixel(rgb, u, s, order):
    """One pixel through the ops in ``order`` (0 brightness, 1 contrast, 2 saturation, 3 hue),
    each clamped, saturation and hue each with their own colorsys HSV round trip."""
    r, g, b = rgb
    for op in order:
        if op == 0:
            r, g, b = (_clamp01(v + (2 * u[0] - 1) * s) for v in (r, g, b))
        elif op == 1:
            r, g, b = (_clamp01(v * (1 - s + 2 * s * u[1])) for v in (r, g, b))
        elif op == 2:
            h, sat, v = colorsys.rgb_to_hsv(r, g, b)
            r, g, b = (_clamp01(c) for c in colorsys.hsv_to_rgb(h, _clamp01(sat * (1 - s + 2 * s * u[2])), v))
        else:
            h, sat, v = colorsys.rgb_to_hsv(r, g, b)
            r, g, b = (_clamp01(c) for c in colorsys.hsv_to_rgb((h + (2 * u[3] - 1) * s) % 1.0, sat, v))
    return r, g, b


def ref_jitter(img01, u, s, order):
    out = torch.empty_like(img01)
    for b in range(img01.shape[0]):
        ub = u[b].tolist()
        for i in range(img01.shape[2]):
            for j in range(img01.shape[3]):
                out[b, :, i, j] = torch.tensor(ref_jitter_pixel(img01[b, :, i, j].tolist(), ub, s, order))
    return out


ALL_ORDERS = list(itertools.permutations(range(4)))


# Factors with contrast > 1 and clamping pixels: without clamping, hue commutes with
# brightness and contrast and saturation with contrast, so orders would look alike.
U_TEETH = torch.tensor([[0.9, 0.95, 0.1, 0.8], [0.1, 0.9, 0.9, 0.2]])


def _distinct(a, b):
    return not torch.allclose(a, b, atol=1e-4, rtol=0)


def _sat_hue_swap(a, b):
    """Orders equal up to swapping adjacent saturation and hue (which commute)."""
    return any(a[i:i + 2] == b[i:i + 2][::-1] and set(a[i:i + 2]) == {2, 3}
               and a[:i] == b[:i] and a[i + 2:] == b[i + 2:] for i in range(3))


def test_every_order_matches_colorsys():
    x = torch.rand(2, 3, 3, 4, generator=torch.Generator().manual_seed(3))
    refs = {order: ref_jitter(x, U_TEETH, 0.2, order) for order in ALL_ORDERS}
    for order in ALL_ORDERS:
        torch.testing.assert_close(color_jitter(x, 0.2, factors=U_TEETH, order=order), refs[order],
                                   atol=4e-6, rtol=0, msg=f"order {order}")
    for a, b in itertools.combinations(ALL_ORDERS, 2):  # the orders really differ (test has teeth)
        assert _distinct(refs[a], refs[b]) or _sat_hue_swap(a, b), (a, b)
    per_image = [(3, 1, 0, 2), (0, 2, 1, 3)]
    torch.testing.assert_close(color_jitter(x, 0.2, factors=U_TEETH, order=per_image),
                               torch.cat([refs[per_image[0]][:1], refs[per_image[1]][1:]]), atol=4e-6, rtol=0)
    with pytest.raises(ValueError, match="permutation"):
        color_jitter(x, 0.2, factors=U_TEETH, order=(0, 1, 1, 3))
    with pytest.raises(ValueError, match="one permutation per image"):
        color_jitter(x, 0.2, factors=U_TEETH, order=[(0, 1, 2, 3)] * 3)


def test_fused_jitter_shares_one_round_trip_and_default_makes_one_per_op():
    """``fused=True`` (--fused-jitter) with the fixed order is bit for bit brightness,
    contrast, then saturation and hue in one HSV round trip; the default makes one round
    trip per op (kornia 0.5.8), a few 1e-6 apart from the fused form."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 9, 7, generator=g)
    u = torch.rand(3, 4, generator=g)
    s = 0.2
    w = u.view(3, 4, 1, 1, 1)
    y = (x + (2 * w[:, 0] - 1) * s).clamp(0, 1)
    y = (y * (1 - s + 2 * s * w[:, 1])).clamp(0, 1)
    hsv = rgb_to_hsv(y)
    sat = (hsv[:, 1:2] * (1 - s + 2 * s * w[:, 2])).clamp(0, 1)
    hue = torch.remainder(hsv[:, 0:1] + (2 * w[:, 3] - 1) * s, 1.0)
    fused = hsv_to_rgb(torch.cat((hue, sat, hsv[:, 2:3]), 1)).clamp(0, 1)
    assert torch.equal(color_jitter(x, s, factors=u, order=(0, 1, 2, 3), fused=True), fused)
    hsv = rgb_to_hsv(y)
    sat = (hsv[:, 1:2] * (1 - s + 2 * s * w[:, 2])).clamp(0, 1)
    y = hsv_to_rgb(torch.cat((hsv[:, 0:1], sat, hsv[:, 2:3]), 1)).clamp(0, 1)
    hsv = rgb_to_hsv(y)
    hue = torch.remainder(hsv[:, 0:1] + (2 * w[:, 3] - 1) * s, 1.0)
    per_op = hsv_to_rgb(torch.cat((hue, hsv[:, 1:3]), 1)).clamp(0, 1)
    assert torch.equal(color_jitter(x, s, factors=u, order=(0, 1, 2, 3)), per_op)
    assert torch.equal(color_jitter(x, s, factors=u), per_op)  # the default order of color_jitter
    assert not torch.equal(per_op, fused)
    torch.testing.assert_close(per_op, fused, atol=2e-5, rtol=0)


def test_order_draw_is_a_uniform_permutation():
    drawn = [draw_jitter_order(random.Random(i)) for i in range(2400)]
    counts = {o: drawn.count(o) for o in ALL_ORDERS}
    assert set(drawn) == set(ALL_ORDERS)
    assert all(60 <= n <= 140 for n in counts.values()), counts  # ~100 each; 4+ sigma bounds


def _call(x, seed, per_image, blur=False):
    """strong_augment with host rng and device generator seeded by ``seed``, and the same
    draws replayed here: the orders (host), the factors [B,4] (generator)."""
    y = strong_augment(x, StrongParams(jitter=True, blur=blur), random.Random(seed),
                       torch.Generator().manual_seed(seed), per_image=per_image)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    orders = [tuple(rng.sample(range(4), 4)) for _ in range(x.shape[0] if per_image else 1)]
    u = torch.rand(x.shape[0], 4, generator=gen)
    return y, orders, u, gen


def test_strong_augment_uses_a_fresh_order_per_call():
    x = renormalize(torch.rand(2, 3, 3, 4, generator=torch.Generator().manual_seed(5)))
    x01 = denormalize(x)
    orders_seen, not_fixed = set(), 0
    for seed in range(30):
        y, (order,), u, _ = _call(x, seed, per_image=False)
        ref = ref_jitter(x01, u, 0.2, order)  # one order for the whole batch
        torch.testing.assert_close(denormalize(y), ref, atol=1e-5, rtol=0, msg=f"seed {seed}")
        orders_seen.add(order)
        not_fixed += _distinct(ref, ref_jitter(x01, u, 0.2, (0, 1, 2, 3)))
    assert len(orders_seen) >= 12 and not_fixed >= 20


def test_mixed_samples_get_their_own_order_and_sigma():
    x = renormalize(torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(7)))  # a real image: 0..1
    for seed in range(4):
        y, orders, u, gen = _call(x, seed, per_image=True, blur=True)
        sigma = 0.15 + torch.rand(2, generator=gen)   # U(0.15, 1.15), one per mixed sample, after the factors
        jittered = renormalize(torch.cat([ref_jitter(denormalize(x[i:i + 1]), u[i:i + 1], 0.2, orders[i])
                                          for i in range(2)]))
        torch.testing.assert_close(y, gaussian_blur(jittered, sigma.tolist()), atol=2e-4, rtol=1e-5)
        again = strong_augment(x, StrongParams(jitter=True, blur=True), random.Random(seed),
                               torch.Generator().manual_seed(seed), per_image=True)
        assert torch.equal(y, again)  # a pure function of the two generators: resume replays it


def test_device_constants_are_built_once():
    from sepico_fast.augment import IMAGENET_MEAN, IMAGENET_STD, device_constants
    a, b = device_constants(torch.device("cpu")), device_constants(torch.device("cpu"))
    assert all(p is q for p, q in zip(a, b))
    assert a[0].flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert a[1].flatten().tolist() == pytest.approx(IMAGENET_STD)


# ---------------------------------------------------------------------------------------
# kornia 0.5.8's ColorJitter, op by op, as documented there: H in radians, S with eps 1e-6,
# hue shifted by h·2π with fmod, HSV→RGB through an 18-candidate gather; each of saturation
# and hue makes its own round trip; fp32 as kornia runs it.
# ---------------------------------------------------------------------------------------
def kornia_rgb_to_hsv(img, eps=1e-6):
    maxc, argmax = img.max(1)
    minc = img.min(1).values
    delta = maxc - minc
    s = delta / (maxc + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc.unsqueeze(1) - img).unbind(1)
    h = torch.stack((bc - gc, (rc - bc) + 2.0 * delta, (gc - rc) + 4.0 * delta), 1) / delta.unsqueeze(1)
    h = h.gather(1, argmax.unsqueeze(1)).squeeze(1)
    h = 2 * math.pi * ((h / 6.0) % 1.0)
    return torch.stack((h, s, maxc), 1)


def kornia_hsv_to_rgb(hsv):
    h, s, v = hsv[:, 0] / (2 * math.pi), hsv[:, 1], hsv[:, 2]
    hi = torch.floor(h * 6) % 6
    f = (h * 6) % 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.long()
    cand = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), 1)
    return cand.gather(1, torch.stack((hi, hi + 6, hi + 12), 1))


def kornia_jitter(img01, u, s, order):
    w = u.view(-1, 4, 1, 1, 1)
    x = img01
    for op in order:
        if op == 0:
            x = (x + (2 * w[:, 0] - 1) * s).clamp(0, 1)
        elif op == 1:
            x = (x * (1 - s + 2 * s * w[:, 1])).clamp(0, 1)
        elif op == 2:
            hsv = kornia_rgb_to_hsv(x)
            sat = (hsv[:, 1:2] * (1 - s + 2 * s * w[:, 2])).clamp(0, 1)
            x = kornia_hsv_to_rgb(torch.cat((hsv[:, :1], sat, hsv[:, 2:]), 1))
        else:
            hsv = kornia_rgb_to_hsv(x)
            hue = torch.fmod(hsv[:, :1] + (2 * w[:, 3] - 1) * s * 2 * math.pi, 2 * math.pi)
            x = kornia_hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), 1))
    return x


def test_rgb_to_hsv_uses_kornias_eps():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(8)) * 0.02  # dark: eps matters
    ours, ref = rgb_to_hsv(x), kornia_rgb_to_hsv(x)
    torch.testing.assert_close(ours[:, 1:], ref[:, 1:], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ours[:, 0] * 2 * math.pi, ref[:, 0], atol=2e-5, rtol=0)
    assert (rgb_to_hsv(x, eps=1e-8)[:, 1] - ref[:, 1]).abs().max() > 1e-5  # the old eps is visibly off


def test_every_order_matches_kornia_058_and_fused_is_the_deviation():
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 0.05])
    u = torch.cat([U_TEETH, torch.rand(2, 4, generator=g)])
    fused_apart = 0.0
    for order in ALL_ORDERS:
        ref = kornia_jitter(x, u, 0.2, order)
        torch.testing.assert_close(color_jitter(x, 0.2, factors=u, order=order), ref, atol=1e-6, rtol=0,
                                   msg=f"order {order}")
        fused_apart = max(fused_apart, (color_jitter(x, 0.2, factors=u, order=order, fused=True) - ref)
                          .abs().max().item())
    assert 1e-6 < fused_apart < 3e-5  # the shared round trip: a visible, small deviation
