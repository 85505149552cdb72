"""DINOv2 ViT encoders (patch 14) and the simple feature pyramid SePiCo's heads need.

Numerics follow transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (the layout of
the ``facebook/dinov2-*`` hub files, loaded by ``sepico_fast.checkpoint``):

* patch embedding: a 14x14 stride-14 convolution;
* tokens ``[cls, registers..., patches...]``; the learned position embeddings (a square grid,
  37x37 for the 518-pixel hub models) are resized to the input's patch grid with bicubic
  interpolation (``align_corners=False``, computed in float32; with ``antialias=True`` for
  the register models, as transformers does) and added to cls and the patches, never to
  the registers; the grid is used as is when it already fits;
* pre-norm blocks: ``x + drop_path(ls1 * attn(norm1(x)))``, ``x + drop_path(ls2 * mlp(norm2(x)))``
  with LayerNorm eps 1e-6, multi-head attention with one fused ``qkv`` Linear (rows: query,
  key, value, as the separate HF projections concatenated) and scale 1/sqrt(head dim),
  exact (erf) GELU MLP of ratio 4, and LayerScale vectors ``ls1.gamma`` / ``ls2.gamma``;
* the final LayerNorm ``norm``.

Parameter names are those of the original DINOv2 code (``cls_token``, ``pos_embed``,
``register_tokens``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,ls1,norm2,
mlp.fc1,mlp.fc2,ls2}``, ``norm``). The mask token of the self-supervised pre-training is not
kept (it never enters a forward pass without a mask).

For segmentation the encoder returns four maps (``forward``): the patch tokens after four
evenly spaced blocks (depth 12: blocks 3, 6, 9, 12), each through the final LayerNorm (as
DINOv2's own ``get_intermediate_layers(norm=True)`` and transformers' ``Dinov2Backbone``), and
resampled from the stride-14 grid to strides 4, 8, 16 and 32 of the input (sizes ceil(H/s) x
ceil(W/s), like MiT's maps). The resampling is a fixed linear filter, no parameters:
bilinear where the level is finer than the token grid, a triangle filter as wide as the
step where it is coarser (antialiased, so the stride-32 map averages tokens instead of
skipping them), exact in pixel coordinates (the centre of output cell j at s*(j+0.5) reads
the tokens around it). It is applied as two small matrix products per level.

Input sizes that are not multiples of 14 are zero-padded around the image to the next
multiple (split evenly between both sides: DINOv2's ``CenterPadding`` of its segmentation
evaluation); the pyramid reads only the image's own area back, so every input size works and
no flag needs a multiple of 14.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import exporting, use_cpu_kernels
from .mit import CPU_EXPLICIT_ATTENTION_MAX, DropPath, explicit_attention

PATCH = 14
PYRAMID_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class DinoV2Config:
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = PATCH
    pos_grid: int = 37            # side of the square position-embedding grid (518 / 14 on the hub)
    num_registers: int = 0
    layer_norm_eps: float = 1e-6
    layerscale_init: float = 1.0  # transformers' random init (trained files carry their own values)

    @property
    def out_indices(self) -> tuple[int, ...]:
        """Blocks whose outputs feed the pyramid: the last of each quarter of the depth."""
        return tuple(self.depth * (k + 1) // 4 - 1 for k in range(4))

    @property
    def antialias_pos(self) -> bool:
        """transformers resizes the position grid with antialiasing in the register models only."""
        return self.num_registers > 0


_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}

DINOV2_CONFIGS: dict[str, DinoV2Config] = {
    **{f"vit{k}14": DinoV2Config(d, n, h) for k, (d, n, h) in _SIZES.items()},
    **{f"vit{k}14_reg": DinoV2Config(d, n, h, num_registers=4) for k, (d, n, h) in _SIZES.items()},
    # Not a published model: a small CPU-sized variant for smoke runs, tests and the synthetic
    # pair (trained from scratch); position grid 10x10 = a 140-pixel input (128 padded).
    "tiny": DinoV2Config(64, 4, 2, pos_grid=10),
}


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [B, D, H/14, W/14]


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention, one fused qkv projection, SDPA (scale 1/sqrt(head dim))."""

    upstream_layout = False  # see models/layout.py

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # CPU, short sequences (the tiny variant): the explicit product is faster (see mit.py).
        if use_cpu_kernels(self, q) and q.shape[0] * q.shape[1] * n * n <= CPU_EXPLICIT_ATTENTION_MAX:
            out = explicit_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class Block(nn.Module):
    def __init__(self, config: DinoV2Config, drop_path: float):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, config.num_heads)
        self.ls1 = LayerScale(dim, config.layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.ls2 = LayerScale(dim, config.layerscale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def resample_matrix(n_out: int, stride: int, grid: int, pad_before: int, patch: int = PATCH,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """[n_out, grid] weights taking a stride-``patch`` token row (the input padded by
    ``pad_before`` pixels) to ``n_out`` cells of ``stride`` pixels of the unpadded input.

    Cell j's centre s*(j+0.5) sits at token coordinate u = (s*(j+0.5) + pad)/patch - 0.5
    (clamped to the grid); the weights are a triangle of half-width max(1, s/patch) around
    u, normalised to sum 1: bilinear interpolation when upsampling, an antialiased linear
    filter when downsampling.
    """
    j = torch.arange(n_out, device=device, dtype=torch.float32)
    u = ((j + 0.5) * stride + pad_before) / patch - 0.5
    u = u.clamp(0, grid - 1)
    width = max(1.0, stride / patch)
    taps = torch.arange(grid, device=device, dtype=torch.float32)
    w = (1 - (u[:, None] - taps[None, :]).abs() / width).clamp_min(0)
    return (w / w.sum(dim=1, keepdim=True)).to(dtype)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT; ``forward`` returns the stride-4/8/16/32 pyramid (NCHW, width ``dim`` each)."""

    upstream_layout = False  # see models/layout.py

    def __init__(self, config: DinoV2Config, in_channels: int = 3, drop_path_rate: float = 0.1):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = config
        d = config.dim
        self.widths = (d,) * 4
        self.patch_size = config.patch_size
        self.num_registers = config.num_registers
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid ** 2, d))
        if config.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_registers, d))
        self.patch_embed = PatchEmbed(in_channels, d, config.patch_size)
        rates = torch.linspace(0, drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(config, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' random init: trunc-normal(0.02) Linear/conv weights, cls token and
        position embeddings; zero biases and registers; unit LayerNorm; LayerScale at its init."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, self.config.layerscale_init)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.num_registers:
            nn.init.zeros_(self.register_tokens)

    # ------------------------------------------------------------------------------ tokens
    def patch_pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings of a gh x gw patch grid, [1, gh*gw, D] (transformers' rule)."""
        g = self.config.pos_grid
        pos = self.pos_embed[:, 1:]
        if not exporting() and (gh, gw) == (g, g):  # an exported graph resizes always (any input size)
            return pos
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False,
                             antialias=self.config.antialias_pos).to(pos.dtype)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(token sequence [B, 1+R+gh*gw, D], gh, gw) of an input whose sides are multiples of 14."""
        b = x.shape[0]
        patches = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        gh, gw = patches.shape[2], patches.shape[3]
        patches = patches.flatten(2).transpose(1, 2) + self.patch_pos_embed(gh, gw)
        parts = [(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)]
        if self.num_registers:
            parts.append(self.register_tokens.expand(b, -1, -1))
        return torch.cat(parts + [patches], dim=1), gh, gw

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[embeddings, output of block 1, ..., output of block L, final LayerNorm of the last]:
        transformers' ``hidden_states`` followed by its ``last_hidden_state`` (token order
        cls, registers, patches; the input sides must be multiples of 14)."""
        seq, _, _ = self.embed(x)
        out = [seq]
        for blk in self.blocks:
            seq = blk(seq)
            out.append(seq)
        return out + [self.norm(seq)]

    # ------------------------------------------------------------------------------ pyramid
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        p = self.patch_size
        ph, pw = -h % p, -w % p
        top, left = ph // 2, pw // 2
        if ph or pw or exporting():  # exported: always (a zero pad where none is needed)
            x = F.pad(x, (left, pw - left, top, ph - top))
        seq, gh, gw = self.embed(x)
        skip = 1 + self.num_registers
        wanted = self.config.out_indices
        maps = []
        for i, blk in enumerate(self.blocks):
            seq = blk(seq)
            if i in wanted:
                maps.append(self.norm(seq[:, skip:]).reshape(b, gh, gw, -1))
        outs = []
        for tokens, s in zip(maps, PYRAMID_STRIDES):
            mh = resample_matrix(-(-h // s), s, gh, top, p, tokens.device, tokens.dtype)
            mw = resample_matrix(-(-w // s), s, gw, left, p, tokens.device, tokens.dtype)
            outs.append(self._resample(tokens, mh, mw))
        return outs

    @staticmethod
    def _resample(tokens: torch.Tensor, mh: torch.Tensor, mw: torch.Tensor) -> torch.Tensor:
        """[B, gh, gw, D] tokens -> [B, D, H', W'] map (channels_last strides, no copy)."""
        b, gh, gw, d = tokens.shape
        rows = torch.matmul(mh, tokens.reshape(b, gh, gw * d))             # [B, H', gw*D]
        cells = torch.matmul(mw, rows.reshape(b * mh.shape[0], gw, d))     # [B*H', W', D]
        return cells.reshape(b, mh.shape[0], mw.shape[0], d).permute(0, 3, 1, 2)
