"""Decode and projection heads with the upstream (mmseg/DAFormer/SePiCo) state-dict layout.

``ConvModule`` mirrors mmcv's conv -> BN -> ReLU block: parameters ``conv.*`` and
``bn.*``; the conv has a bias only when there is no norm.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv_taps import depthwise_conv_taps, summed_conv_taps
from .layout import use_cpu_kernels, use_cpu_nchw


class ConvModule(nn.Module):
    upstream_layout = False  # see models/layout.py

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *,
                 padding: int = 0, dilation: int = 1, groups: int = 1,
                 norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                              dilation=dilation, groups=groups, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = act
        # mmcv init: He-normal (fan-out, ReLU gain) conv, unit BN, zero bias.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        # Dilated depthwise (DAFormer sep-ASPP): oneDNN's CPU weight gradient is very slow.
        self.dilated_depthwise = groups > 1 and groups == in_channels == out_channels and dilation > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dilated_depthwise and use_cpu_kernels(self, x):
            x = depthwise_conv_taps(x, self.conv.weight, self.conv.bias, self.conv.dilation[0],
                                    self.conv.padding[0])
        else:
            x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.act else x


def _resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_concat(feats: Sequence[torch.Tensor], resize_first: bool = False) -> torch.Tensor:
    """Bilinearly resize every map to the first map's size and concatenate along channels."""
    size = feats[0].shape[2:]
    # Level 0 is already at the target size (bilinear to the same size is the identity; the
    # authors still run it, ``resize_first``: a copy).
    first = _resize_to(feats[0], size) if resize_first else feats[0]
    return torch.cat([first] + [_resize_to(f, size) for f in feats[1:]], dim=1)


class MLPEmbed(nn.Module):
    """Per-pixel Linear C_in -> C_out (upstream ``embed_layers.i.proj``), NCHW in and out."""

    upstream_layout = False  # see models/layout.py

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upstream_layout:  # the authors: tokens copied in, result copied to NCHW
            b, _, h, w = x.shape
            out = self.proj(x.flatten(2).transpose(1, 2).contiguous())
            return out.permute(0, 2, 1).contiguous().reshape(b, -1, h, w)
        # Linear over the channel axis of an NHWC view: a single GEMM, and the result is
        # returned as an NCHW tensor with channels_last strides (no copy either way) ...
        out = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # ... except on the CPU, where the sep-ASPP fusion behind it runs ~1.5-2x faster
        # forward + backward on contiguous NCHW (oneDNN's 3x3 weight gradient above all);
        # the copy is of the 256-channel embedding before upsampling (bench/NOTES.md).
        return out.contiguous() if use_cpu_nchw(self, out) else out


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, 3, padding=dilation,
                                         dilation=dilation, groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPPFusion(nn.Module):
    """DAFormer ``fuse_layer``: ASPP without image pooling, separable branches for d > 1."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1) if d == 1
            else DepthwiseSeparableConvModule(in_channels, channels, d)
            for d in dilations
        )
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """Per-level Linear embeddings -> upsample to level 0 -> concat -> sep-ASPP -> dropout -> 1x1 classifier."""

    def __init__(self, in_channels: Sequence[int], num_classes: int = 19, embed_dim: int = 256,
                 dilations: Sequence[int] = (1, 6, 12, 18), dropout: float = 0.1):
        super().__init__()
        # conv_seg first: the upstream base class registers it before the subclass modules.
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.embed_layers = nn.ModuleList(MLPEmbed(c, embed_dim) for c in in_channels)
        self.fuse_layer = SepASPPFusion(len(in_channels) * embed_dim, embed_dim, dilations)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        embedded = [embed(f) for embed, f in zip(self.embed_layers, feats)]
        x = self.fuse_layer(resize_concat(embedded))
        return self.conv_seg(self.dropout(x))


class DLV2Head(nn.Module):
    """DeepLab-v2 classifier: sum of four biased dilated 3x3 convs on the last backbone map."""

    upstream_layout = False  # see models/layout.py

    def __init__(self, in_channels: int, num_classes: int = 19,
                 dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.dilations = tuple(dilations)
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, num_classes, 3, padding=d, dilation=d, norm=False, act=False)
            for d in dilations
        )
        # Upstream init_cfg (method §2): Normal(std 0.01) over aspp_modules overrides the
        # ConvModule kaiming init; kaiming here would be ~10x larger logits at the start.
        for m in self.aspp_modules:
            nn.init.normal_(m.conv.weight, 0.0, 0.01)
            nn.init.zeros_(m.conv.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        if use_cpu_kernels(self, x):  # one GEMM for all 36 taps instead of four im2col convs
            return summed_conv_taps(x, [m.conv.weight for m in self.aspp_modules],
                                    [m.conv.bias for m in self.aspp_modules], self.dilations)
        out = self.aspp_modules[0](x)
        for m in self.aspp_modules[1:]:
            out = out + m(x)
        return out


def l2_normalize(x: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||_2, eps) along ``dim``, returned in x's dtype.

    16-bit inputs (autocast) accumulate the norm in fp32; fp32 and fp64 inputs in their own
    precision (``vector_norm`` refuses a narrowing ``dtype=``, so fp64 must not ask for fp32).
    """
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc)
    return (x / norm.clamp_min(eps)).to(x.dtype)


class ProjHead(nn.Module):
    """SePiCo projection head: two 1x1 conv-BN-ReLU layers, then L2 normalisation over channels.

    ``resize_concat=True`` (DAFormer): input is all levels resized to level 0 and
    concatenated, hidden width = in/levels. Otherwise (DeepLab-v2): the last level only,
    hidden width = in.
    """

    upstream_layout = False  # see models/layout.py

    def __init__(self, in_channels: Sequence[int], proj_dim: int = 512, *, resize_concat: bool):
        super().__init__()
        self.use_resize_concat = resize_concat
        if resize_concat:
            total = sum(in_channels)
            mid = total // len(in_channels)
        else:
            total = mid = in_channels[-1]
        self.convs = nn.Sequential(ConvModule(total, mid, 1), ConvModule(mid, proj_dim, 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = resize_concat(feats, self.upstream_layout) if self.use_resize_concat else feats[-1]
        return l2_normalize(self.convs(x))
