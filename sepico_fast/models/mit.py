"""Mix Transformer (MiT, SegFormer) backbone with the upstream state-dict layout.

Module names follow the NVlabs/DAFormer implementation so that ``mit_b*.pth``
ImageNet files and SePiCo checkpoints load without renaming:
``patch_embed{s}.proj/norm``, ``block{s}.{i}.norm1/attn/norm2/mlp``, ``norm{s}``.

Numerics kept from upstream: LayerNorm eps 1e-5 in the patch embeddings and in
the attention's spatial-reduction norm, 1e-6 in the block and stage norms; exact
(erf) GELU; K/V from one ``kv`` Linear (first C outputs = K, last C = V) with
heads taking contiguous channel slices; stochastic depth linear in the block
index up to ``drop_path_rate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import use_cpu_kernels


@dataclass(frozen=True)
class MiTConfig:
    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


# Upstream variants (SegFormer paper table / NVlabs code); widths of B1..B5 are equal.
MIT_CONFIGS: dict[str, MiTConfig] = {
    "b0": MiTConfig((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": MiTConfig((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": MiTConfig((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": MiTConfig((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": MiTConfig((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": MiTConfig((64, 128, 320, 512), (3, 6, 40, 3)),
    # Not upstream: a small CPU-sized variant for smoke runs and tests.
    "tiny": MiTConfig((16, 32, 64, 128), (1, 1, 1, 1), num_heads=(1, 1, 2, 4)),
}


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples of a residual branch with prob ``drop_prob``,
    rescale the rest by 1/(1-drop_prob); identity in eval mode. No state-dict entries."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    @property
    def active(self) -> bool:
        return self.drop_prob != 0.0 and self.training

    def masks(self, x: torch.Tensor, n: int = 1) -> torch.Tensor:
        """[n, B, 1, ...] independent scaled sample masks (0 or 1/(1-drop_prob)) in one draw."""
        keep = 1.0 - self.drop_prob
        return x.new_empty((n, x.shape[0]) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x times a fresh sample mask, or times ``mask`` (one of ``masks()``) when given."""
        if not self.active:
            return x
        return x * (self.masks(x)[0] if mask is None else mask)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv + LayerNorm(eps 1e-5); returns tokens [B, H*W, C] and the grid size."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


# CPU: attention maps up to this many elements (8 MB in fp32) are computed explicitly
# (matmul, softmax, matmul): for MiT's short key sequences (stage 1 at crop 256: N = 4096,
# N' = 64) that is ~6x faster forward + backward than the flash kernel; at N' = 256 both
# are about equal (bench/NOTES.md). Larger maps use the flash kernel, which never
# materialises them.
CPU_EXPLICIT_ATTENTION_MAX = 1 << 21


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v with the attention map materialised (the authors' formulation)."""
    attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return attn.softmax(dim=-1) @ v


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys/values come from a map reduced by ``sr_ratio``."""

    upstream_layout = False  # see models/layout.py

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        # Registration order = upstream state-dict order: q, kv, proj, sr, norm.
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            # [B,N,C] -> [B,C,H,W]: a view whose strides are already channels_last.
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            x = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        explicit = self.upstream_layout or (  # map size only read where the CPU choice applies
            use_cpu_kernels(self, q) and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= CPU_EXPLICIT_ATTENTION_MAX)
        if explicit:
            out = explicit_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as upstream
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """Depthwise 3x3 conv on the token grid (named ``dwconv.dwconv`` upstream)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))  # exact erf GELU


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # Both branches' stochastic-depth masks in one draw (3 launches fewer per block).
        m = self.drop_path.masks(x, 2) if self.drop_path.active else (None, None)
        x = x + self.drop_path(self.attn(self.norm1(x), h, w), m[0])
        return x + self.drop_path(self.mlp(self.norm2(x), h, w), m[1])


class MixVisionTransformer(nn.Module):
    """Four-stage MiT encoder: returns maps at strides 4, 8, 16, 32 (NCHW)."""

    upstream_layout = False  # see models/layout.py

    def __init__(self, config: MiTConfig, in_channels: int = 3, drop_path_rate: float = 0.1):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = config
        self.widths = tuple(config.widths)
        # All patch embeddings are registered before the blocks, as upstream.
        prev = in_channels
        for s, width in enumerate(config.widths, start=1):
            patch, stride = (7, 4) if s == 1 else (3, 2)
            setattr(self, f"patch_embed{s}", OverlapPatchEmbed(prev, width, patch, stride))
            prev = width
        rates = torch.linspace(0, drop_path_rate, sum(config.depths), device="cpu").tolist()
        start = 0
        for s, (width, depth) in enumerate(zip(config.widths, config.depths), start=1):
            blocks = nn.ModuleList(
                Block(width, config.num_heads[s - 1], config.sr_ratios[s - 1],
                      config.mlp_ratio, rates[start + i])
                for i in range(depth)
            )
            start += depth
            setattr(self, f"block{s}", blocks)
            setattr(self, f"norm{s}", nn.LayerNorm(width, eps=1e-6))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream random init: trunc-normal(0.02) Linear, He-normal (fan-out) conv, unit LayerNorm."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        b = x.shape[0]
        for s in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{s}")(x)
            for blk in getattr(self, f"block{s}"):
                tokens = blk(tokens, h, w)
            tokens = getattr(self, f"norm{s}")(tokens)
            # Tokens [B,N,C] viewed as [B,C,H,W] have channels_last strides; no copy here.
            # (The authors copy each stage output to contiguous NCHW.)
            x = tokens.transpose(1, 2).reshape(b, -1, h, w)
            if self.upstream_layout:
                x = x.contiguous()
            outs.append(x)
        return outs
