"""Fused DistCL / ProtoCL pixel-to-centroid contrast loss (method §5), forward + backward.

Math. Features z_i ∈ R^A (rows of ``feat``, L2-normalised upstream), labels y_i, class means
μ_c and diagonal variances σ²_c (c < C, fp32 statistics without gradient), temperature τ
(a divisor), ratio λ:

    s_ic = z_i·μ_c/τ + κ Σ_a z_ia² σ²_ca,          κ = λ / (2τ²)   (κ = 0: ProtoCL)
    ℓ_i  = −z_i·μ_{y_i}/τ + logsumexp_c s_ic       (= −log softmax(s_i)[y_i] + κ Σ_a z_ia² σ²_{y_i,a})
    ∂ℓ_i/∂z_i = Σ_c (p_ic − [c = y_i]) μ_c/τ + 2κ z_i ⊙ Σ_c p_ic σ²_c,   p_i = softmax(s_i)

over the n valid pixels V = {i : y_i ≠ ignore_index}; the regulariser uses z̄ = Σ_V z_i / n:

    r = Σ_c log softmax_c(z̄·μ_c/τ) / (C ln C),   ∂r/∂z̄ = (Σ_c μ_c − C Σ_c q_c μ_c) / (τ C ln C)
    L = Σ_V ℓ_i / n + w r            (L = 0 and ∂L/∂z = 0 when n = 0; r = 0 when C = 1)
    ∂L/∂z_i = [i ∈ V] (∂ℓ_i/∂z_i + w ∂r/∂z̄) / n

Kernel layout. One program per BLOCK_N rows. Pass 1 streams z in BLOCK_A-column chunks and
accumulates the two [BLOCK_N, C_PAD] logit tiles on tensor cores (z·μᵀ and (z⊙z)·σ²ᵀ), plus
the block's Σ_V z for the regulariser; then the log-sum-exp, ℓ_i and the soft-max p run on
the tile. Pass 2 re-reads the block's z chunks (still in L2: BLOCK_N·A·2 bytes per program)
and writes g_i = ∂ℓ_i/∂z_i once, as (p − onehot)·μ/τ + 2κ z ⊙ (p·σ²) — two more small dots.
Each program stores its partial Σℓ, n and Σz (fp32, no atomics); the host sums the
per-block partials with torch ops on the device (no host sync), so the result is
deterministic. Backward (``grad_mode="stored"``, the default) is one in-place pass
g ← g·(∂L_out/n) + [i ∈ V]·(∂L_out w ∂r/∂z̄ / n), as fused cross-entropy kernels do: DRAM
traffic is one read of z and one write of g in the forward, one read + write of g in the
backward. ``grad_mode="recompute"`` skips the forward write and re-runs the kernel in backward
with the scale and the regulariser vector folded into pass 2 (3 passes instead of 4).

Labels outside [0, C) other than ``ignore_index`` make the loss NaN (a kernel cannot raise;
the torch reference raises an index error).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import (
    check_blocks,
    check_device,
    dot_dtype,
    dot_precision,
    launch,
    pow2_at_least,
    row_block_outputs,
)


@triton.jit
def _dist_contrast_fwd_kernel(
    z_ptr, lab_ptr, mu_ptr, var_ptr, g_ptr, loss_part_ptr, cnt_part_ptr, zsum_part_ptr,
    gscale_ptr, gvec_ptr,
    N, A, C, stride_zn, stride_za, stride_gn, ignore_index, inv_tau, var_coef,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, C_PAD: tl.constexpr,
    USE_VAR: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_REG: tl.constexpr,
    SCALED: tl.constexpr, HAS_GVEC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    blk = tl.program_id(0)
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    y = tl.load(lab_ptr + rows, mask=row_in, other=ignore_index).to(tl.int32)
    valid = row_in & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= C))  # out-of-range label: poison the loss
    # 64-bit scalar base of the block (N·A may exceed 2^31), 32-bit offsets inside it
    row0 = (blk * BLOCK_N).to(tl.int64)
    z_blk = z_ptr + row0 * stride_zn
    g_blk = g_ptr + row0 * stride_gn
    r_loc = tl.arange(0, BLOCK_N)
    cls = tl.arange(0, C_PAD)
    cls_in = cls < C

    # ---- pass 1: logits on tensor cores, Σz of the valid rows ----
    acc_mu = tl.zeros([BLOCK_N, C_PAD], dtype=tl.float32)
    acc_var = tl.zeros([BLOCK_N, C_PAD], dtype=tl.float32)
    for a0 in range(0, A, BLOCK_A):
        cols = a0 + tl.arange(0, BLOCK_A)
        col_in = cols < A
        # ignored rows are never read: their loss and gradient are 0 whatever z holds (even
        # NaN/Inf, which a 0 weight would not cancel), and their bytes are not loaded
        z = tl.load(z_blk + r_loc[:, None] * stride_zn + cols[None, :] * stride_za,
                    mask=valid[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        st_mask = col_in[:, None] & cls_in[None, :]
        mu_t = tl.load(mu_ptr + cls[None, :] * A + cols[:, None], mask=st_mask, other=0.0)
        acc_mu = tl.dot(z.to(DOT_DTYPE), mu_t.to(DOT_DTYPE), acc_mu, input_precision=DOT_PREC)
        if USE_VAR:
            var_t = tl.load(var_ptr + cls[None, :] * A + cols[:, None], mask=st_mask, other=0.0)
            acc_var = tl.dot((z * z).to(DOT_DTYPE), var_t.to(DOT_DTYPE), acc_var,
                             input_precision=DOT_PREC)
        if HAS_REG:
            zs = tl.sum(tl.where(valid[:, None], z, 0.0), axis=0)
            tl.store(zsum_part_ptr + blk.to(tl.int64) * A + cols, zs, mask=col_in)

    # ---- per-pixel log-sum-exp and loss ----
    s = acc_mu * inv_tau
    if USE_VAR:
        s += acc_var * var_coef
    s = tl.where(cls_in[None, :], s, float("-inf"))
    s_max = tl.max(s, axis=1)
    e = tl.exp(s - s_max[:, None])
    denom = tl.sum(e, axis=1)
    onehot = cls[None, :] == y[:, None]
    pos = tl.sum(tl.where(onehot, acc_mu, 0.0), axis=1) * inv_tau
    loss = s_max + tl.log(denom) - pos
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_part_ptr + blk, tl.sum(tl.where(valid, loss, 0.0), axis=0))
    tl.store(cnt_part_ptr + blk, tl.sum(valid.to(tl.float32), axis=0))

    # ---- pass 2: g_i = ∂ℓ_i/∂z_i (SCALED: the final s·g_i + [i ∈ V]·v), written once ----
    if WRITE_GRAD:
        p = e / denom[:, None]
        gscale = 1.0
        if SCALED:
            gscale = tl.load(gscale_ptr)
        # dot operands stay O(1) (p − onehot ∈ [−1, 1], p ∈ [0, 1]); the small factors 1/τ,
        # 2κ and the incoming scale are applied in fp32 after the product, so fp16 operands
        # never go subnormal
        coef_mu = tl.where(valid[:, None], p - onehot.to(tl.float32), 0.0).to(DOT_DTYPE)
        coef_var = tl.where(valid[:, None], p, 0.0).to(DOT_DTYPE)
        for a0 in range(0, A, BLOCK_A):
            cols = a0 + tl.arange(0, BLOCK_A)
            col_in = cols < A
            st_mask = cls_in[:, None] & col_in[None, :]
            mu_c = tl.load(mu_ptr + cls[:, None] * A + cols[None, :], mask=st_mask, other=0.0)
            g = tl.dot(coef_mu, mu_c.to(DOT_DTYPE), input_precision=DOT_PREC) * (inv_tau * gscale)
            if USE_VAR:
                var_c = tl.load(var_ptr + cls[:, None] * A + cols[None, :], mask=st_mask,
                                other=0.0)
                w = tl.dot(coef_var, var_c.to(DOT_DTYPE), input_precision=DOT_PREC)
                z = tl.load(z_blk + r_loc[:, None] * stride_zn + cols[None, :] * stride_za,
                            mask=valid[:, None] & col_in[None, :], other=0.0).to(tl.float32)
                g += z * w * (2.0 * var_coef * gscale)
            if HAS_GVEC:
                gvec = tl.load(gvec_ptr + cols, mask=col_in, other=0.0)
                g += tl.where(valid[:, None], gvec[None, :], 0.0)
            tl.store(g_blk + r_loc[:, None] * stride_gn + cols[None, :],
                     g.to(g_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _scale_grad_kernel(
    g_ptr, lab_ptr, scale_ptr, vec_ptr, N, A, stride_gn, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HAS_VEC: tl.constexpr,
):
    """In place: g_i ← g_i · scale + [y_i ≠ ignore] · vec   (scale 0-d, vec [A], fp32)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    row_in = rows < N
    col_in = cols < A
    mask = row_in[:, None] & col_in[None, :]
    ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gn + cols[None, :]
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr)
    if HAS_VEC:
        y = tl.load(lab_ptr + rows, mask=row_in, other=ignore_index)
        vec = tl.load(vec_ptr + cols, mask=col_in, other=0.0)
        g += tl.where((y != ignore_index)[:, None], vec[None, :], 0.0)
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=mask)


def scale_grad_config(a: int) -> dict:
    """Tile of the in-place backward scale (no register spills on sm_90, ptxas -v)."""
    return dict(BLOCK_N=32, BLOCK_A=min(128, pow2_at_least(a)), num_warps=4)


def scale_grad_(g: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                vec: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Launch :func:`_scale_grad_kernel` on a contiguous gradient buffer ``g`` [N, A]."""
    n, a = g.shape
    if n == 0 or a == 0:
        return g
    cfg = scale_grad_config(a)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(a, cfg["BLOCK_A"]))
    launch(_scale_grad_kernel, grid, g,
           g, labels, scale, vec if vec is not None else scale, n, a, g.stride(0), ignore_index,
           HAS_VEC=vec is not None, **cfg)
    return g


def regulariser(zsum: torch.Tensor, n: torch.Tensor, mean: torch.Tensor, temperature: float):
    """r and ∂r/∂z̄ on the device for z̄ = zsum / max(n, 1) (see the module docstring).

    Always fp32: the losses are called inside the training step's autocast region, where
    the two small products would otherwise run in bf16/fp16 (r rounded to ~4e-3). The
    gradient is formed as Σ_c (1 − C q_c) μ_c, not Σ_c μ_c − C Σ_c q_c μ_c, whose two O(1)
    terms cancel to the O(z̄·μ/τ) result.
    """
    c = mean.shape[0]
    with torch.autocast(zsum.device.type, enabled=False):
        zsum, n, mean = zsum.float(), n.float(), mean.float()
        zbar = zsum / n.clamp_min(1.0)
        if c < 2:  # C ln C = 0: the regulariser is identically 0
            return zsum.new_zeros(()), torch.zeros_like(zsum)
        norm = c * math.log(c)
        logits = mean @ zbar / temperature
        r = torch.log_softmax(logits, dim=0).sum() / norm
        q = torch.softmax(logits, dim=0)
        grad = ((1.0 - c * q) @ mean) / (temperature * norm)
    return r, grad


def finish_loss(loss_sum: torch.Tensor, n: torch.Tensor, reg: torch.Tensor | None,
                reg_weight: float):
    """Mean over the valid pixels plus the weighted regulariser; 0 when n = 0. Returns (L, 1/n or 0)."""
    has = n > 0
    inv_n = torch.where(has, 1.0 / n.clamp_min(1.0), 0.0)  # a scalar 0: no zeros_like launch
    loss = loss_sum * inv_n
    if reg is not None:
        loss = loss + reg_weight * reg
    return torch.where(has, loss, 0.0), inv_n


def kernel_config(feat_dtype: torch.dtype, a: int, c: int, *, use_var: bool = True,
                  write_grad: bool = True, has_reg: bool = True, scaled: bool = False,
                  has_gvec: bool = False, block_n: int | None = None,
                  block_a: int | None = None) -> dict:
    """Compile-time parameters of :func:`_dist_contrast_fwd_kernel` for one problem shape.

    Tiles were chosen so that the kernel compiles for sm_90 without register spills (checked
    with ptxas -v, see tests/test_triton_sm90_compile.py); they are not tuned on hardware.
    Half features: 64-row blocks, 64-column chunks, 8 warps (~115 registers, 2 CTAs/SM);
    fp32 features (3xTF32 products need more registers): 16-column chunks, 4 warps.
    """
    ddt = dot_dtype(feat_dtype)
    c_pad = pow2_at_least(c)
    half = ddt != tl.float32
    default_bn = 64 if c_pad <= 32 else 32
    default_ba = (64 if half else 16) if c_pad <= 32 else 16
    return dict(BLOCK_N=block_n or default_bn, BLOCK_A=block_a or min(default_ba, pow2_at_least(a)),
                C_PAD=c_pad, USE_VAR=use_var, WRITE_GRAD=write_grad, HAS_REG=has_reg,
                SCALED=scaled, HAS_GVEC=has_gvec, DOT_DTYPE=ddt, DOT_PREC=dot_precision(ddt), num_warps=8 if half else 4,
                num_stages=3)


def _run_kernel(feat, labels, mean, var, temperature, ratio, ignore_index, *, write_grad,
                has_reg, gscale=None, gvec=None, block_n=None, block_a=None):
    """One launch of the fused kernel; returns (g or None, Σℓ, n, Σz or None) on the device."""
    n_rows, a = feat.shape
    c = mean.shape[0]
    cfg = kernel_config(feat.dtype, a, c, use_var=var is not None, write_grad=write_grad,
                        has_reg=has_reg, scaled=gscale is not None, has_gvec=gvec is not None,
                        block_n=block_n, block_a=block_a)
    out = row_block_outputs(feat, cfg["BLOCK_N"], write_grad=write_grad, has_reg=has_reg)
    grad = out.grad
    launch(_dist_contrast_fwd_kernel, (out.num_blocks,), feat,
           feat, labels, mean, var if var is not None else mean,
           grad if write_grad else feat, out.loss, out.count, out.zsum,
           gscale if gscale is not None else out.loss,
           gvec if gvec is not None else out.loss,
           n_rows, a, c, feat.stride(0), feat.stride(1),
           grad.stride(0) if write_grad else 0, ignore_index, 1.0 / temperature,
           (ratio / (2.0 * temperature**2)) if var is not None else 0.0, **cfg)
    return grad, out.loss.sum(), out.count.sum(), out.zsum.sum(0) if has_reg else None


def _fp32_statistics(feat, mean, var):
    """The class statistics as contiguous fp32 on ``feat``'s device (var may be None: ProtoCL)."""
    mean = mean.to(device=feat.device, dtype=torch.float32).contiguous()
    var = var.to(device=feat.device, dtype=torch.float32).contiguous() if var is not None else None
    return mean, var


def _forward(feat, labels, mean, var, temperature, ratio, reg_weight, ignore_index, write_grad,
             block_n, block_a):
    """(L, ∂Σℓ/∂z or None, 1/n, the regulariser's gradient vector (already × 1/n) or None);
    ``labels`` contiguous and ``mean``/``var`` from :func:`_fp32_statistics`."""
    has_reg = reg_weight != 0.0
    grad, loss_sum, n, zsum = _run_kernel(
        feat, labels, mean, var, temperature, ratio, ignore_index, write_grad=write_grad,
        has_reg=has_reg, block_n=block_n, block_a=block_a)
    reg = reg_grad = None
    if has_reg:
        reg, reg_grad = regulariser(zsum, n, mean, temperature)
    loss, inv_n = finish_loss(loss_sum, n, reg, reg_weight)
    return loss, grad, inv_n, (reg_weight * reg_grad * inv_n if has_reg else None)


def _recomputed_grad(feat, labels, mean, var, temperature, ratio, ignore_index, scale, vec, block_n, block_a):
    """∂L/∂z from the fused pass run again on ``feat``, written once (grad_mode="recompute")."""
    g, *_ = _run_kernel(feat, labels, mean, var, temperature, ratio, ignore_index,
                        write_grad=True, has_reg=False, gscale=scale,
                        gvec=vec.contiguous() if vec is not None else None,
                        block_n=block_n, block_a=block_a)
    return g


class _DistContrastFunction(torch.autograd.Function):
    """L(feat); ∂L/∂feat either stored by the forward kernel and scaled in backward
    (``grad_mode="stored"``) or recomputed by the backward kernel ("recompute")."""

    @staticmethod
    def forward(ctx, feat, labels, mean, var, temperature, ratio, reg_weight, ignore_index,
                grad_mode, block_n, block_a, need_grad):
        mean, var = _fp32_statistics(feat, mean, var)
        labels = labels.contiguous()
        # needs_input_grad is True even under torch.no_grad(); need_grad (grad mode of the
        # caller) avoids writing an N×A gradient nobody will read
        need_grad = need_grad and ctx.needs_input_grad[0]
        store = need_grad and grad_mode == "stored"
        loss, grad, inv_n, vec = _forward(feat, labels, mean, var, temperature, ratio, reg_weight,
                                          ignore_index, store, block_n, block_a)
        ctx.grad, ctx.inv_n, ctx.vec = grad, inv_n, vec
        ctx.args = (labels, mean, var, temperature, ratio, ignore_index, block_n, block_a)
        ctx.grad_mode = grad_mode
        if grad_mode == "recompute" and need_grad:
            ctx.save_for_backward(feat)
        return loss

    @staticmethod
    @once_differentiable  # the gradient comes from a kernel: no graph for double backward
    def backward(ctx, grad_out):
        grad_out = grad_out.to(torch.float32)
        scale = (grad_out * ctx.inv_n).reshape(1)
        vec = grad_out * ctx.vec if ctx.vec is not None else None
        labels, mean, var, temperature, ratio, ignore_index, block_n, block_a = ctx.args
        if ctx.grad_mode == "recompute":
            (feat,) = ctx.saved_tensors
            g = _recomputed_grad(feat, labels, mean, var, temperature, ratio, ignore_index, scale, vec,
                                 block_n, block_a)
        else:
            if ctx.grad is None:
                raise RuntimeError("dist/proto_contrast_loss (triton): backward called twice; "
                                   "the stored gradient is scaled in place, use "
                                   "retain_graph=False or grad_mode='recompute'")
            g, ctx.grad = ctx.grad, None
            scale_grad_(g, labels, scale, vec, ignore_index)
        return g, None, None, None, None, None, None, None, None, None, None, None


# --- Under torch.compile: the same kernels as opaque custom ops ---------------------------
# Dynamo cannot trace the autograd.Function above (its gradient buffer lives on ``ctx`` and
# is scaled in place), so a compiled graph calls the launchers through torch.library custom
# ops instead: opaque to the compiler (no graph break, no retracing of the launchers), with
# a fake implementation for shapes and a backward registered with the op. Same kernels,
# same numbers; the backward scales a copy of the stored gradient (one more N×A pass).
@torch.library.custom_op("sepico_fast::dist_contrast_forward", mutates_args=())
def _dist_forward_op(feat: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | None,
                     temperature: float, ratio: float, reg_weight: float, ignore_index: int,
                     write_grad: bool, block_n: int | None, block_a: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂Σℓ/∂z [N, A] when ``write_grad`` else [0, A], 1/n, regulariser gradient vector [A])."""
    mean, var = _fp32_statistics(feat, mean, var)
    loss, grad, inv_n, vec = _forward(feat, labels.contiguous(), mean, var, temperature, ratio, reg_weight,
                                      ignore_index, write_grad, block_n, block_a)
    if grad is None:  # custom ops return tensors: empty placeholders for "none"
        grad = feat.new_empty((0, feat.shape[1]))
    if vec is None:
        vec = feat.new_zeros(feat.shape[1], dtype=torch.float32)
    return loss, grad, inv_n, vec


@_dist_forward_op.register_fake
def _(feat, labels, mean, var, temperature, ratio, reg_weight, ignore_index, write_grad, block_n, block_a):
    n, a = feat.shape
    return (feat.new_empty((), dtype=torch.float32), feat.new_empty((n if write_grad else 0, a)),
            feat.new_empty((), dtype=torch.float32), feat.new_empty((a,), dtype=torch.float32))


@torch.library.custom_op("sepico_fast::dist_contrast_backward", mutates_args=())
def _dist_backward_op(feat: torch.Tensor | None, stored: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                      var: torch.Tensor | None, temperature: float, ratio: float, ignore_index: int,
                      scale: torch.Tensor, vec: torch.Tensor | None, block_n: int | None,
                      block_a: int | None) -> torch.Tensor:
    """∂L/∂z: the stored gradient scaled (a copy) when ``feat`` is None, else the kernel re-run on ``feat``."""
    labels = labels.contiguous()
    if feat is None:
        return scale_grad_(stored.clone(), labels, scale, vec, ignore_index)
    mean, var = _fp32_statistics(feat, mean, var)
    return _recomputed_grad(feat, labels, mean, var, temperature, ratio, ignore_index, scale, vec, block_n, block_a)


@_dist_backward_op.register_fake
def _(feat, stored, labels, mean, var, temperature, ratio, ignore_index, scale, vec, block_n, block_a):
    return torch.empty_like(stored if feat is None else feat, memory_format=torch.contiguous_format)


def _dist_setup_context(ctx, inputs, output):
    feat, labels, mean, var, temperature, ratio, reg_weight, ignore_index, write_grad, block_n, block_a = inputs
    _, grad, inv_n, vec = output
    # the features are kept only when the backward recomputes from them (as the eager path)
    ctx.save_for_backward(None if write_grad else feat, grad, labels, mean, var, inv_n, vec)
    ctx.args = (temperature, ratio, ignore_index, reg_weight != 0.0, block_n, block_a)


def _dist_backward(ctx, grad_loss, *_unused):
    feat, stored, labels, mean, var, inv_n, vec = ctx.saved_tensors
    temperature, ratio, ignore_index, has_reg, block_n, block_a = ctx.args
    grad_loss = grad_loss.to(torch.float32)
    g = _dist_backward_op(feat, stored, labels, mean, var, temperature, ratio, ignore_index,
                          (grad_loss * inv_n).reshape(1), grad_loss * vec if has_reg else None, block_n, block_a)
    return g, None, None, None, None, None, None, None, None, None, None


_dist_forward_op.register_autograd(_dist_backward, setup_context=_dist_setup_context)


def _compiled_dist(feat, labels, mean, var, temperature, ratio, reg_weight, ignore_index, grad_mode,
                   block_n, block_a, need_grad):
    write_grad = need_grad and grad_mode == "stored"
    return _dist_forward_op(feat, labels, mean, var, temperature, ratio, reg_weight, ignore_index, write_grad,
                            block_n, block_a)[0]


def _needs_grad(feat: torch.Tensor) -> bool:
    """Whether autograd will record this call (the forward kernels then write ∂ℓ/∂z)."""
    return torch.is_grad_enabled() and feat.requires_grad


GRAD_MODES = ("stored", "recompute")


def _check_grad_mode(grad_mode: str) -> str:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    return grad_mode


def dist_contrast_loss(feat: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                       var: torch.Tensor, temperature: float = 100.0, ratio: float = 1.0,
                       reg_weight: float = 0.0, ignore_index: int = 255, *,
                       grad_mode: str = "stored", block_n: int | None = None,
                       block_a: int | None = None) -> torch.Tensor:
    """DistCL of method §5 (see the module docstring); 0-d fp32, differentiable w.r.t. ``feat``.

    feat [N, A] fp32/fp16/bf16 (any strides), labels [N] integer, mean/var [C, A] (used as
    fp32 statistics, no gradient); arguments are assumed validated by ``sepico_fast.contrast``.

    ``grad_mode``: "stored" (default) writes ∂ℓ/∂z in the forward pass and scales it in place
    in backward — 4 passes of N×A over DRAM (read z, write g; read g, write g), one extra
    N×A buffer held until backward. "recompute" computes only the loss in the forward and
    re-runs the fused pass in backward, writing the final gradient once — 3 passes (read z;
    read z, write g), nothing held but ``feat``, twice the (small) tensor-core work.
    ``block_n``/``block_a`` override the launcher's tile sizes (tests cover several blocks).
    """
    check_device(feat, labels, mean, var)
    check_blocks(block_n, block_a)
    apply = _compiled_dist if torch.compiler.is_compiling() else _DistContrastFunction.apply
    return apply(feat, labels, mean, var, float(temperature), float(ratio), float(reg_weight), int(ignore_index),
                 _check_grad_mode(grad_mode), block_n, block_a, _needs_grad(feat))


def proto_contrast_loss(feat: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                        temperature: float = 100.0, reg_weight: float = 0.0,
                        ignore_index: int = 255, *, grad_mode: str = "stored",
                        block_n: int | None = None, block_a: int | None = None) -> torch.Tensor:
    """ProtoCL of method §5: the DistCL kernel compiled without the variance term (σ² = 0)."""
    check_device(feat, labels, mean)
    check_blocks(block_n, block_a)
    apply = _compiled_dist if torch.compiler.is_compiling() else _DistContrastFunction.apply
    return apply(feat, labels, mean, None, float(temperature), 1.0, float(reg_weight), int(ignore_index),
                 _check_grad_mode(grad_mode), block_n, block_a, _needs_grad(feat))
