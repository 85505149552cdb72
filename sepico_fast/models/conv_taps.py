"""Stride-1 "same" convolutions written as sums of shifted taps: the CPU fast paths.

A k×k convolution with dilation d and padding p = d(k−1)/2 is, for every output pixel q,

    y[q] = Σ_taps W_tap · x[q + o_tap],    o_tap = (i·d − p, j·d − p),  x = 0 outside the map

so each tap is one shifted, overlapping slice of the map. Two layers of SePiCo are much
slower through oneDNN on the CPU than this formulation (measurements: bench/NOTES.md):

* the DAFormer head's *dilated depthwise* 3×3 convs (dilations 6/12/18 on 1024 channels):
  oneDNN's weight gradient takes seconds per call at 64×64 and its forward is several times
  slower on channels_last inputs. :func:`depthwise_conv_taps` does 9 multiply-adds per pixel
  and channel forward and backward, in any memory format;
* the DeepLab-v2 head (four dilated 3×3 convs 2048→19 summed), which runs through the
  im2col ``_slow_conv2d`` path: :func:`summed_conv_taps` does all 36 taps in one 1×1 GEMM
  (2048 → 36·19 channels) followed by 36 shifted adds of 19-channel maps.

Same mathematics as ``F.conv2d`` (sums in a different order: float rounding only); taps
that fall entirely into the zero padding are skipped (their weights get a zero gradient,
as they would from the convolution). Reference: ``F.conv2d`` (tests/test_conv_taps.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check_same_conv(kernel_hw: tuple[int, int], dilation: int, padding: int) -> None:
    kh, kw = kernel_hw
    if kh != kw or kh % 2 == 0 or 2 * padding != dilation * (kh - 1):
        raise ValueError(f"tap convolution needs an odd square kernel with 'same' padding "
                         f"p = d(k-1)/2; got kernel {kernel_hw}, dilation {dilation}, padding {padding}")


def live_taps(kernel: int, dilation: int, padding: int, hw: tuple[int, int]):
    """[(tap index i·k + j, dy, dx)] of the taps that reach at least one pixel of an H×W map."""
    h, w = hw
    taps = []
    for i in range(kernel):
        for j in range(kernel):
            dy, dx = i * dilation - padding, j * dilation - padding
            if abs(dy) < h and abs(dx) < w:
                taps.append((i * kernel + j, dy, dx))
    return taps


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of 16-bit taps are accumulated in float32 (as a convolution accumulates)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _autocast_inputs(*tensors):
    """Cast to the autocast dtype when autocast is on, as ``F.conv2d`` would be."""
    first = tensors[0]
    if torch.is_autocast_enabled(first.device.type):
        dtype = torch.get_autocast_dtype(first.device.type)
        return tuple(t.to(dtype) if t is not None else None for t in tensors)
    return tensors


def _slices(dy: int, dx: int, h: int, w: int):
    """(output slice, input slice) of a tap with offset (dy, dx): y[out] += x[in]."""
    y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
    out = (slice(None), slice(None), slice(y0, y1), slice(x0, x1))
    inp = (slice(None), slice(None), slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))
    return out, inp


class _DepthwiseTaps(torch.autograd.Function):
    """y = Σ_taps w[:, tap] · shift_tap(x), per channel; gradients by the same slices."""

    @staticmethod
    def forward(ctx, x, weight, bias, dilation, padding):
        b, c, h, w = x.shape
        k = weight.shape[-1]
        taps = live_taps(k, dilation, padding, (h, w))
        w_flat = weight.reshape(c, k * k)
        centre = (k * k) // 2  # offset (0, 0): always live, and it starts y in x's layout
        acc = _accumulate_dtype(x.dtype)
        y = x.to(acc) * w_flat[:, centre].to(acc).view(1, c, 1, 1)
        if bias is not None:
            y.add_(bias.view(1, c, 1, 1))
        for t, dy, dx in taps:
            if t == centre:
                continue
            out, inp = _slices(dy, dx, h, w)
            y[out].addcmul_(x[inp], w_flat[:, t].view(1, c, 1, 1))
        ctx.save_for_backward(x, weight)
        ctx.taps = taps
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        k = weight.shape[-1]
        w_flat = weight.reshape(c, k * k)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        centre = (k * k) // 2
        gx = gy * w_flat[:, centre].view(1, c, 1, 1) if need_x else None
        gw = torch.zeros(c, k * k, dtype=weight.dtype, device=weight.device) if need_w else None
        for t, dy, dx in ctx.taps:
            out, inp = _slices(dy, dx, h, w)
            if need_x and t != centre:
                gx[inp].addcmul_(gy[out], w_flat[:, t].view(1, c, 1, 1))
            if need_w:
                gw[:, t] = (gy[out] * x[inp]).sum(dim=(0, 2, 3))
        gb = gy.sum(dim=(0, 2, 3)) if (need_b and ctx.has_bias) else None
        return gx, (gw.view_as(weight) if need_w else None), gb, None, None


def depthwise_conv_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        dilation: int = 1, padding: int = 0) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, 1, padding, dilation, groups=C)`` for weight [C,1,k,k]."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv_taps: x must be [B,C,H,W] and weight [C,1,k,k]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    _check_same_conv(tuple(weight.shape[-2:]), dilation, padding)
    x, weight, bias = _autocast_inputs(x, weight, bias)
    return _DepthwiseTaps.apply(x, weight, bias, dilation, padding)


class _ShiftSum(torch.autograd.Function):
    """y[:, o, q] = Σ_t z[:, t, o, q + o_t] (zero outside): the shifted adds of tap outputs."""

    @staticmethod
    def forward(ctx, z, offsets):
        b, _, o, h, w = z.shape
        y = z.new_zeros(b, o, h, w, dtype=_accumulate_dtype(z.dtype))
        for t, (dy, dx) in enumerate(offsets):
            out, inp = _slices(dy, dx, h, w)
            y[out] += z[:, t][inp]
        ctx.offsets = offsets
        ctx.z_shape = z.shape
        return y.to(z.dtype)

    @staticmethod
    def backward(ctx, gy):
        b, n, o, h, w = ctx.z_shape
        gz = gy.new_zeros(b, n, o, h, w)
        for t, (dy, dx) in enumerate(ctx.offsets):
            out, inp = _slices(dy, dx, h, w)
            gz[:, t][inp] = gy[out]
        return gz, None


def summed_conv_taps(x: torch.Tensor, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor | None], dilations: Sequence[int]) -> torch.Tensor:
    """Σ_i ``F.conv2d(x, weights[i], biases[i], padding=d_i, dilation=d_i)`` (stride 1, same size).

    All live taps of all convolutions become one 1×1 convolution (a single GEMM over the
    input channels), then the [B, taps, O, H, W] tap outputs are shifted and summed.
    """
    if x.dim() != 4:
        raise ValueError(f"summed_conv_taps: x must be [B,C,H,W], got {tuple(x.shape)}")
    b, c, h, w = x.shape
    rows, offsets = [], []
    out_ch = weights[0].shape[0]
    for weight, d in zip(weights, dilations):
        if weight.shape[1] != c or weight.shape[0] != out_ch:
            raise ValueError(f"summed_conv_taps: weight {tuple(weight.shape)} does not fit input "
                             f"channels {c} / output channels {out_ch}")
        k = weight.shape[-1]
        _check_same_conv(tuple(weight.shape[-2:]), d, d)
        flat = weight.reshape(out_ch, c, k * k)
        for t, dy, dx in live_taps(k, d, d, (h, w)):
            rows.append(flat[:, :, t])
            offsets.append((dy, dx))
    stacked = torch.cat(rows, dim=0).view(-1, c, 1, 1)  # [taps·O, C, 1, 1]
    z = F.conv2d(x, stacked).view(b, len(offsets), out_ch, h, w)
    y = _ShiftSum.apply(z, tuple(offsets))
    bias = [bb for bb in biases if bb is not None]
    if bias:
        y = y + _BiasSum.apply(*bias).to(y.dtype).view(1, out_ch, 1, 1)
    return y


@torch.library.custom_op("sepico_fast::gradient_copies", mutates_args=())
def _gradient_copies(g: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` copies of ``g``, each in its own memory. A custom op because a compiler sees
    through ``clone``: inductor removes clones of one buffer and hands that buffer back n
    times; an opaque op's outputs cannot be merged, so compiled graphs keep them apart
    and the bias sum needs no graph break."""
    return [g.clone(memory_format=torch.contiguous_format) for _ in range(n)]


@_gradient_copies.register_fake
def _(g: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [torch.empty_like(g, memory_format=torch.contiguous_format) for _ in range(n)]


def _gradient_copies_backward(ctx, grads):
    # copies of g: the gradient of g is the sum of theirs (double backward through the bias sum)
    return sum(g for g in grads if g is not None), None


_gradient_copies.register_autograd(_gradient_copies_backward)


class _BiasSum(torch.autograd.Function):
    """b_0 + b_1 + … of same-shaped biases, each bias receiving a gradient tensor of its own.

    ``torch.stack(biases).sum(0)`` computes the same sum, but its backward hands every bias
    a view of one buffer; autograd adopts such a view as ``.grad``, so the biases' ``.grad``
    would share storage and every later backward pass (training accumulates three before a
    step) would add its gradient once per alias.
    """

    @staticmethod
    def forward(ctx, *biases):
        ctx.n = len(biases)
        return torch.stack(biases).sum(0)

    @staticmethod
    def backward(ctx, g):
        return tuple(_gradient_copies(g, ctx.n))
