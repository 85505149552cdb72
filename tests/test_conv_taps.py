"""Tap convolutions (sepico_fast/models/conv_taps.py) against F.conv2d, and the CPU fast
layout of the segmentors against their upstream layout (same outputs, same gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sepico_fast.models import build_segmentor
from sepico_fast.models.conv_taps import depthwise_conv_taps, summed_conv_taps


@pytest.mark.parametrize("dilation", [1, 2, 5, 9, 12])  # 9, 12: taps partly / wholly in the padding
def test_depthwise_taps_match_conv2d_and_its_gradients(dilation):
    g = torch.Generator().manual_seed(dilation)
    x = torch.randn(2, 6, 10, 11, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    gy = torch.randn(2, 6, 10, 11, dtype=torch.float64, generator=g)
    ref = F.conv2d(x, w, b, 1, dilation, dilation, 6)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy)
    out = depthwise_conv_taps(x, w, b, dilation, dilation)
    grads = torch.autograd.grad(out, (x, w, b), gy)
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_depthwise_taps_channels_last_float32_and_no_bias():
    x = torch.randn(1, 16, 20, 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 1, 3, 3, requires_grad=True)
    ref = F.conv2d(x, w, None, 1, 6, 6, 16)
    out = depthwise_conv_taps(x, w, None, 6, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-3)


def test_summed_taps_match_four_dilated_convs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 12, dtype=torch.float64, generator=g, requires_grad=True)
    dil = (1, 3, 6, 10)
    ws = [torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in dil]
    bs = [torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) for _ in dil]
    ref = sum(F.conv2d(x, w, b, padding=d, dilation=d) for w, b, d in zip(ws, bs, dil))
    out = summed_conv_taps(x, ws, bs, dil)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, [x, *ws, *bs], gy), torch.autograd.grad(ref, [x, *ws, *bs], gy)):
        torch.testing.assert_close(a, r)


def test_taps_under_bf16_autocast_return_bf16_like_conv2d():
    x = torch.randn(1, 8, 12, 12)
    w = torch.randn(8, 1, 3, 3)
    wd = torch.randn(3, 8, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dw = depthwise_conv_taps(x, w, None, 2, 2)
        dense = summed_conv_taps(x, [wd], [torch.zeros(3)], [2])
        ref = F.conv2d(x, w, None, 1, 2, 2, 8)
    assert dw.dtype == dense.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(dw.float(), F.conv2d(x, w, None, 1, 2, 2, 8), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(dense.float(), F.conv2d(x, wd, padding=2, dilation=2), rtol=2e-2, atol=1e-1)


def test_taps_reject_what_they_cannot_compute():
    with pytest.raises(ValueError, match="same' padding"):
        depthwise_conv_taps(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), None, 2, 1)
    with pytest.raises(ValueError, match="weight \\[C,1,k,k\\]"):
        depthwise_conv_taps(torch.randn(1, 4, 8, 8), torch.randn(5, 1, 3, 3), None, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        summed_conv_taps(torch.randn(1, 4, 8, 8), [torch.randn(3, 5, 3, 3)], [None], [1])


@pytest.mark.parametrize("arch", ["daformer_tiny", "dlv2_tiny"])
def test_fast_cpu_layout_equals_upstream_layout(arch):
    """Same network, CPU fast paths (taps, NCHW embeddings, explicit attention) vs the
    authors' layout (F.conv2d, SDPA-free explicit attention, their copies): outputs and
    parameter gradients agree to float32 rounding, in training mode."""
    torch.manual_seed(0)
    fast = build_segmentor(arch, 19, 16, drop_path_rate=0.0).train()
    for m in fast.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    import copy

    slow = copy.deepcopy(fast).use_upstream_layout(True)
    img = torch.randn(2, 3, 96, 96)
    outs = []
    for model in (fast, slow):
        seg, proj = model(img)
        (seg.square().mean() + (proj * torch.linspace(-1, 1, proj.shape[1]).view(1, -1, 1, 1)).mean()).backward()
        outs.append((seg, proj, {n: p.grad for n, p in model.named_parameters()}))
    (seg_f, proj_f, g_f), (seg_s, proj_s, g_s) = outs
    torch.testing.assert_close(seg_f, seg_s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proj_f, proj_s, rtol=1e-4, atol=1e-5)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_s[name], rtol=1e-3, atol=1e-5, msg=name)


def test_explicit_attention_equals_sdpa():
    from sepico_fast.models.mit import explicit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (50, 7, 7))
    torch.testing.assert_close(explicit_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
