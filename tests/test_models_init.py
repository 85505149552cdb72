"""Head initialisation (method §2) and float64 models.

Expected statistics are written out here from the init rules themselves (N(0, 0.01²);
kaiming-normal fan_out/ReLU std = sqrt(2 / (out_channels · kh · kw)); PyTorch's Linear
default U(±1/sqrt(fan_in))), not taken from the implementation.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sepico_fast.checkpoint import load_official
from sepico_fast.models import build_segmentor
from sepico_fast.models.heads import DAFormerHead, DLV2Head, ProjHead, l2_normalize


def _assert_normal(w: torch.Tensor, std: float, rel: float, what: str) -> None:
    n = w.numel()
    w = w.detach()
    got_std = float(w.double().std())
    assert abs(got_std / std - 1) < rel, f"{what}: std {got_std:.5f}, expected {std:.5f}"
    assert abs(float(w.double().mean())) < 5 * std / math.sqrt(n), f"{what}: mean {float(w.mean())}"


def _kaiming_fan_out_std(w: torch.Tensor) -> float:
    out_ch, _, kh, kw = w.shape
    return math.sqrt(2.0 / (out_ch * kh * kw))


def _check_conv_bn_blocks(module: nn.Module, rel: float, skip=()) -> int:
    """Every conv+BN block: kaiming-normal fan_out, BN weight 1 / bias 0. Returns the count."""
    count = 0
    for name, m in module.named_modules():
        if name in skip or not (hasattr(m, "conv") and hasattr(m, "bn") and m.bn is not None):
            continue
        _assert_normal(m.conv.weight, _kaiming_fan_out_std(m.conv.weight), rel, name)
        assert m.conv.bias is None
        assert torch.equal(m.bn.weight, torch.ones_like(m.bn.weight))
        assert torch.equal(m.bn.bias, torch.zeros_like(m.bn.bias))
        count += 1
    return count


def test_dlv2_head_classifier_convs_are_normal_001_with_zero_bias():
    torch.manual_seed(0)
    head = DLV2Head(2048, 19)  # the ResNet-101 head: 19 x 2048 x 3 x 3 per conv
    assert len(head.aspp_modules) == 4
    for i, m in enumerate(head.aspp_modules):
        _assert_normal(m.conv.weight, 0.01, 0.02, f"aspp_modules.{i}")
        assert torch.equal(m.conv.bias, torch.zeros(19))
    # Before the fix these were kaiming fan_out: std sqrt(2 / (19·9)) ≈ 0.108, about 10x.
    assert float(head.aspp_modules[0].conv.weight.detach().std()) < 0.2 * math.sqrt(2 / (19 * 9))


def test_daformer_head_init():
    torch.manual_seed(1)
    head = DAFormerHead((64, 128, 320, 512), 19, 256)  # the MiT-B5 head
    _assert_normal(head.conv_seg.weight, 0.01, 0.05, "conv_seg")
    assert torch.equal(head.conv_seg.bias, torch.zeros(19))
    assert _check_conv_bn_blocks(head.fuse_layer, rel=0.05) == 8  # 1 + 2·3 ASPP blocks + bottleneck
    for i, embed in enumerate(head.embed_layers):  # Linear: PyTorch default, U(±1/sqrt(fan_in))
        fan_in = embed.proj.weight.shape[1]
        bound = 1 / math.sqrt(fan_in)
        assert float(embed.proj.weight.detach().abs().max()) <= bound
        assert float(embed.proj.bias.detach().abs().max()) <= bound
        _assert_normal(embed.proj.weight, bound / math.sqrt(3), 0.05, f"embed_layers.{i}")


@pytest.mark.parametrize("resize_concat, widths", [(True, (64, 128, 320, 512)), (False, (256, 512, 1024, 2048))])
def test_projection_head_is_kaiming_with_unit_bn(resize_concat, widths):
    torch.manual_seed(2)
    head = ProjHead(widths, 512, resize_concat=resize_concat)
    assert _check_conv_bn_blocks(head, rel=0.05) == 2


@pytest.mark.parametrize("arch", ["dlv2_tiny", "daformer_tiny"])
def test_segmentor_heads_and_pretrained_backbone_overwrites_only_the_backbone(arch):
    torch.manual_seed(3)
    plain = build_segmentor(arch, 19, 16)
    donor = build_segmentor(arch, 19, 16)
    with torch.no_grad():
        for p in donor.backbone.parameters():
            p.add_(1.0)
    backbone_file = {k: v.clone() for k, v in donor.backbone.state_dict().items()}  # backbone-local names
    torch.manual_seed(3)
    loaded = build_segmentor(arch, 19, 16)
    load_official(loaded, backbone_file)
    for k, v in loaded.backbone.state_dict().items():
        assert torch.equal(v, backbone_file[k]), k
    for name in ("decode_head", "auxiliary_head"):
        for (k, a), b in zip(getattr(plain, name).state_dict().items(), getattr(loaded, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k} changed by loading a backbone file"
    if arch == "dlv2_tiny":
        for m in loaded.decode_head.aspp_modules:
            _assert_normal(m.conv.weight, 0.01, 0.1, "tiny aspp")
            assert not m.conv.bias.any()
    else:
        _assert_normal(loaded.decode_head.conv_seg.weight, 0.01, 0.2, "tiny conv_seg")


@pytest.mark.parametrize("arch", ["dlv2_tiny", "daformer_tiny"])
def test_float64_model_forward(arch):
    """``build_segmentor(...).double()`` runs (it used to fail in l2_normalize) and agrees with
    the float32 model; the projection equals raw / sqrt(sum raw²) computed here in fp64."""
    torch.manual_seed(4)
    m32 = build_segmentor(arch, 19, 16).eval()
    m64 = build_segmentor(arch, 19, 16).eval()
    m64.load_state_dict(m32.state_dict())
    m64.double()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        seg64, proj64 = m64(img.double())
        seg32, proj32 = m32(img)
        feats = m64.extract(img.double())
        x = feats if m64.auxiliary_head.use_resize_concat else feats[-1:]
        if m64.auxiliary_head.use_resize_concat:
            size = x[0].shape[2:]
            x = [x[0]] + [nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in x[1:]]
        raw = m64.auxiliary_head.convs(torch.cat(x, dim=1))
    assert seg64.dtype == proj64.dtype == torch.float64
    torch.testing.assert_close(proj64, raw / raw.pow(2).sum(1, keepdim=True).sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seg64.float(), seg32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(proj64.float(), proj32, rtol=1e-4, atol=1e-4)


def test_l2_normalize_keeps_fp32_norm_for_16_bit_inputs():
    x = torch.full((2, 8, 3, 3), 300.0, dtype=torch.float16)  # squares overflow fp16 (300² · 8 > 65504)
    y = l2_normalize(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((2, 8, 3, 3), 1 / math.sqrt(8)), rtol=1e-3, atol=1e-3)
    b = torch.randn(2, 5, 4, 4).bfloat16()
    ref = b.double() / b.double().pow(2).sum(1, keepdim=True).sqrt()
    assert l2_normalize(b).dtype == torch.bfloat16
    torch.testing.assert_close(l2_normalize(b).double(), ref, rtol=1e-2, atol=1e-2)
    d = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(l2_normalize(d), d / d.pow(2).sum(1, keepdim=True).sqrt(), rtol=1e-15, atol=1e-15)
