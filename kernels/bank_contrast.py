"""Fused BankCL memory-bank contrast loss (method §5), forward + backward.

Math. Bank b_{c,j} (j < L_c valid entries of class c, fp32 [C, M, A], no gradient), bank
means b̄_c = Σ_{j<L_c} b_{c,j} / L_c, temperature τ. For a valid pixel i of class y:

    p_ij = z_i·b_{y,j}/τ   (j < L_y),      n_ik = z_i·b̄_k/τ   (k ≠ y, L_k > 0)
    S_i  = logsumexp_k n_ik  (−∞ when there is no negative class)
    ℓ_i  = (1/L_y) Σ_j −log(e^{p_ij} / (e^{p_ij} + Σ_k e^{n_ik})) = (1/L_y) Σ_j softplus(S_i − p_ij)
    σ_ij = sigmoid(S_i − p_ij),   π_ik = softmax_k(n_ik)
    ∂ℓ_i/∂z_i = (1/(τ L_y)) [ −Σ_j σ_ij b_{y,j} + (Σ_j σ_ij) Σ_k π_ik b̄_k ]

(n_ik is the mean of z_i·b_{k,j}/τ over j, i.e. one dot with the mean row, so the negatives
are one [N,A]×[A,C] product). Pixels whose own bank is empty (L_y = 0) have no positive
pair and are left out of the loss mean; the regulariser (see ``dist_contrast``) uses the
class means ``mean`` and all non-ignore pixels, as in DistCL/ProtoCL.

Kernel layout. Pixels are visited in label-sorted order (``perm``, one argsort of the
labels on the device), so a block of BLOCK_N pixels usually spans one or two classes. Pass 1
streams the block's z over A chunks for the negatives (one [BLOCK_N, C_PAD] product with the
bank means) and Σz. Then, one class segment c at a time (only the classes present in the
block), the [BLOCK_N, M_PAD] positive logit tile z·B_cᵀ is accumulated on tensor cores
(rows of other classes masked out), turned into the loss and the weights σ, π in registers,
and the gradient of that segment's rows is written once (to rows perm[i]) by a second
A-chunk loop: g = (U·B̄ − σ·B_c) / (τ L_c). Only one [BLOCK_N, M_PAD] tile is live at a time;
z and the bank rows are re-read from L2. Rows without a positive pair get g = 0. Never
materialises N×C×M: FLOPs ≈ 2·N·A·(M_PAD + C_PAD)·2. Without sorting the kernel is still
correct, only slower (a block spans more classes). The gradient is stored by the forward
and scaled in place in backward, as for DistCL (``scale_grad_``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import (
    check_blocks,
    check_device,
    device_capability,
    dot_dtype,
    dot_precision,
    launch,
    pow2_at_least,
    row_block_outputs,
)
from .dist_contrast import _needs_grad, finish_loss, regulariser, scale_grad_


@triton.jit
def _bank_contrast_fwd_kernel(
    z_ptr, lab_ptr, perm_ptr, bank_ptr, blen_ptr, bmean_ptr, g_ptr,
    loss_part_ptr, cnt_part_ptr, valid_part_ptr, zsum_part_ptr,
    N, A, C, M, stride_bc, stride_zn, stride_za, stride_gn, ignore_index, inv_tau,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, C_PAD: tl.constexpr, M_PAD: tl.constexpr,
    SORTED: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_REG: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    blk = tl.program_id(0)
    pos = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    pos_in = pos < N
    if SORTED:
        rows = tl.load(perm_ptr + pos, mask=pos_in, other=0).to(tl.int64)
    else:
        rows = pos.to(tl.int64)
    y = tl.load(lab_ptr + rows, mask=pos_in, other=ignore_index).to(tl.int32)
    valid = pos_in & (y != ignore_index)
    in_range = (y >= 0) & (y < C)
    bad = valid & (in_range == 0)
    y_safe = tl.where(valid & in_range, y, 0)
    has_pos = valid & in_range & (tl.load(blen_ptr + y_safe, mask=valid & in_range, other=0) > 0)
    y_lo = tl.min(tl.where(has_pos, y, C), axis=0)
    y_hi = tl.max(tl.where(has_pos, y, -1), axis=0)

    cls = tl.arange(0, C_PAD)
    cls_in = cls < C
    len_cls = tl.load(blen_ptr + cls, mask=cls_in, other=0).to(tl.int32)
    slot = tl.arange(0, M_PAD)

    # ---- negatives: one product with the bank means; Σz for the regulariser ----
    acc_n = tl.zeros([BLOCK_N, C_PAD], dtype=tl.float32)
    for a0 in range(0, A, BLOCK_A):
        cols = a0 + tl.arange(0, BLOCK_A)
        col_in = cols < A
        # ignored rows are never read (no loss, g = 0 whatever they hold, NaN/Inf included)
        z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_za,
                    mask=valid[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        bm_t = tl.load(bmean_ptr + cls[None, :] * A + cols[:, None],
                       mask=col_in[:, None] & cls_in[None, :], other=0.0)
        acc_n = tl.dot(z.to(DOT_DTYPE), bm_t.to(DOT_DTYPE), acc_n, input_precision=DOT_PREC)
        if HAS_REG:
            zs = tl.sum(tl.where(valid[:, None], z, 0.0), axis=0)
            tl.store(zsum_part_ptr + blk.to(tl.int64) * A + cols, zs, mask=col_in)

    # ---- negatives: S_i = logsumexp over the allowed classes, π_i = their softmax ----
    neg_ok = cls_in[None, :] & (cls[None, :] != y[:, None]) & (len_cls > 0)[None, :]
    n_logit = tl.where(neg_ok, acc_n * inv_tau, float("-inf"))
    n_max = tl.max(n_logit, axis=1)
    has_neg = n_max > float("-inf")
    n_max_safe = tl.where(has_neg, n_max, 0.0)
    n_exp = tl.exp(n_logit - n_max_safe[:, None])
    n_den = tl.where(has_neg, tl.sum(n_exp, axis=1), 1.0)
    lse_neg = tl.where(has_neg, n_max_safe + tl.log(n_den), float("-inf"))
    pi = tl.where(has_neg[:, None], n_exp / n_den[:, None], 0.0)

    # ---- per class c present in the block: positives z·B_cᵀ, loss, and g of its rows ----
    # (one class segment at a time keeps a single [BLOCK_N, M_PAD] tile live)
    loss = tl.where(bad, float("nan"), 0.0)
    for c in range(y_lo, y_hi + 1):
        sel = has_pos & (y == c)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            len_c = tl.load(blen_ptr + c).to(tl.int32)
            inv_len = 1.0 / len_c.to(tl.float32)
            bank_c = bank_ptr + c * stride_bc
            acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
            for a0 in range(0, A, BLOCK_A):
                cols = a0 + tl.arange(0, BLOCK_A)
                col_in = cols < A
                z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_za,
                            mask=sel[:, None] & col_in[None, :], other=0.0)
                b_t = tl.load(bank_c + slot[None, :] * A + cols[:, None],
                              mask=col_in[:, None] & (slot < len_c)[None, :], other=0.0)
                acc = tl.dot(z.to(DOT_DTYPE), b_t.to(DOT_DTYPE), acc, input_precision=DOT_PREC)
            # ℓ_ij = softplus(S_i − p_ij), stable for any sign; x = −∞ without negatives
            x = lse_neg[:, None] - acc * inv_tau
            entry_ok = sel[:, None] & (slot < len_c)[None, :]
            softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            loss += tl.sum(tl.where(entry_ok, softplus, 0.0), axis=1) * inv_len
            if WRITE_GRAD:
                # g = (U·B̄ − W·B_c) / (τ L_c), W_ij = σ_ij, U_ik = (Σ_j σ_ij) π_ik; operands
                # stay O(1) and 1/(τ L_c) is applied in fp32 (fp16 operands never go subnormal)
                sig = tl.where(entry_ok, 1.0 / (1.0 + tl.exp(-x)), 0.0)
                u_neg = (pi * tl.sum(sig, axis=1)[:, None]).to(DOT_DTYPE)
                w_pos = (-sig).to(DOT_DTYPE)
                for a0 in range(0, A, BLOCK_A):
                    cols = a0 + tl.arange(0, BLOCK_A)
                    col_in = cols < A
                    bm = tl.load(bmean_ptr + cls[:, None] * A + cols[None, :],
                                 mask=cls_in[:, None] & col_in[None, :], other=0.0)
                    g = tl.dot(u_neg, bm.to(DOT_DTYPE), input_precision=DOT_PREC)
                    b = tl.load(bank_c + slot[:, None] * A + cols[None, :],
                                mask=(slot < len_c)[:, None] & col_in[None, :], other=0.0)
                    g = tl.dot(w_pos, b.to(DOT_DTYPE), g, input_precision=DOT_PREC)
                    g = g * (inv_len * inv_tau)
                    tl.store(g_ptr + rows[:, None] * stride_gn + cols[None, :],
                             g.to(g_ptr.dtype.element_ty), mask=sel[:, None] & col_in[None, :])

    tl.store(loss_part_ptr + blk, tl.sum(tl.where(has_pos | bad, loss, 0.0), axis=0))
    tl.store(cnt_part_ptr + blk, tl.sum(has_pos.to(tl.float32), axis=0))
    tl.store(valid_part_ptr + blk, tl.sum(valid.to(tl.float32), axis=0))
    if WRITE_GRAD:  # rows without a positive pair (ignored, empty own bank) get g = 0
        zero_rows = pos_in & (has_pos == 0)
        if tl.max(zero_rows.to(tl.int32), axis=0) > 0:
            for a0 in range(0, A, BLOCK_A):
                cols = a0 + tl.arange(0, BLOCK_A)
                tl.store(g_ptr + rows[:, None] * stride_gn + cols[None, :],
                         tl.zeros([BLOCK_N, BLOCK_A], dtype=g_ptr.dtype.element_ty),
                         mask=zero_rows[:, None] & (cols < A)[None, :])


def kernel_config(feat_dtype: torch.dtype, a: int, c: int, m: int, *, sorted_: bool = True,
                  write_grad: bool = True, has_reg: bool = True, block_n: int | None = None,
                  block_a: int | None = None, capability: tuple[int, int] | None = None) -> dict:
    """Compile-time parameters of :func:`_bank_contrast_fwd_kernel` for one problem shape.

    The [BLOCK_N, M_PAD] positive tile lives in registers. For M = 200 (M_PAD = 256) half
    features use 32-row blocks, 32-column chunks and 8 warps (~200 registers, no spills on
    sm_90 by ptxas -v); fp32 features (3xTF32) use 16-row blocks, 4 warps, no pipelining and
    still spill a few hundred bytes — the fast path is half-precision features under AMP.
    Not tuned on hardware.

    ``capability`` < (8, 0) (sm_75: T4, RTX 20xx, 64 KB of shared memory per block): the
    half-precision tile above needs 68 KB there and Triton refuses the launch, so 16-row
    blocks without pipelining are used (51 KB; they spill registers on sm_75, slower but
    correct; see tests/test_triton_sm90_compile.py).
    """
    ddt = dot_dtype(feat_dtype)
    m_pad = pow2_at_least(m)
    half = ddt != tl.float32
    default_bn = max(16, min(64, (8192 if half else 4096) // m_pad))
    stages = 2 if half else 1
    if capability is not None and tuple(capability) < (8, 0):
        default_bn, stages = 16, 1
    return dict(BLOCK_N=block_n or default_bn, BLOCK_A=block_a or min(32, pow2_at_least(a)),
                C_PAD=pow2_at_least(c), M_PAD=m_pad, SORTED=sorted_, WRITE_GRAD=write_grad,
                HAS_REG=has_reg, DOT_DTYPE=ddt, DOT_PREC=dot_precision(ddt),
                num_warps=8 if half else 4, num_stages=stages)


def _launch(feat, labels, bank, bank_len, temperature, mean, reg_weight, ignore_index,
            write_grad, sort, block_n, block_a):
    n_rows, a = feat.shape
    c, m, _ = bank.shape
    dev = feat.device
    has_reg = reg_weight != 0.0
    ddt = dot_dtype(feat.dtype)
    labels = labels.contiguous()
    # statistics: fp32 means of the valid entries, the bank itself in the dot dtype
    bank32 = bank.to(device=dev, dtype=torch.float32)
    blen = bank_len.to(device=dev, dtype=torch.int64).clamp(0, m).contiguous()
    entry = torch.arange(m, device=dev)[None, :, None] < blen[:, None, None]
    # where, not a 0/1 weight: rows past bank_len may hold anything (even NaN) and are unread
    bank_valid = torch.where(entry, bank32, 0.0)
    bmean = (bank_valid.sum(1) / blen.clamp_min(1).to(torch.float32)[:, None]).contiguous()
    bank_dot = bank_valid.to(feat.dtype if ddt != tl.float32 else torch.float32).contiguous()
    sorted_ = sort and n_rows > 1
    perm = torch.argsort(labels) if sorted_ else labels  # (unused placeholder when unsorted)
    cfg = kernel_config(feat.dtype, a, c, m, sorted_=sorted_, write_grad=write_grad,
                        has_reg=has_reg, block_n=block_n, block_a=block_a,
                        capability=device_capability(dev))
    out = row_block_outputs(feat, cfg["BLOCK_N"], write_grad=write_grad, has_reg=has_reg, valid=True)
    grad = out.grad
    launch(_bank_contrast_fwd_kernel, (out.num_blocks,), feat,
           feat, labels, perm, bank_dot, blen, bmean, grad if write_grad else feat,
           out.loss, out.count, out.valid, out.zsum,
           n_rows, a, c, m, m * a, feat.stride(0), feat.stride(1),
           grad.stride(0) if write_grad else 0, ignore_index, 1.0 / temperature, **cfg)
    n_loss = out.count.sum()
    n_valid = out.valid.sum()
    loss, inv_n = finish_loss(out.loss.sum(), n_loss, None, 0.0)
    vec = None
    if has_reg:
        reg, reg_grad = regulariser(out.zsum.sum(0), n_valid, mean.to(dev, torch.float32),
                                    temperature)
        has_valid = n_valid > 0
        inv_valid = torch.where(has_valid, 1.0 / n_valid.clamp_min(1.0), torch.zeros_like(n_valid))
        loss = loss + torch.where(has_valid, reg_weight * reg, torch.zeros_like(reg))
        vec = reg_weight * reg_grad * inv_valid
    return loss, grad, inv_n, vec


class _BankContrastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, labels, bank, bank_len, temperature, mean, reg_weight, ignore_index,
                sort, block_n, block_a, need_grad):
        write_grad = need_grad and ctx.needs_input_grad[0]  # see _DistContrastFunction
        loss, grad, inv_n, vec = _launch(feat, labels, bank, bank_len, temperature, mean,
                                         reg_weight, ignore_index, write_grad, sort, block_n,
                                         block_a)
        ctx.grad, ctx.inv_n, ctx.vec = grad, inv_n, vec
        ctx.labels, ctx.ignore_index = labels.contiguous(), ignore_index
        return loss

    @staticmethod
    @once_differentiable  # the gradient comes from a kernel: no graph for double backward
    def backward(ctx, grad_out):
        if ctx.grad is None:
            raise RuntimeError("bank_contrast_loss (triton): backward called twice; the "
                               "gradient buffer is scaled in place, use retain_graph=False")
        g, ctx.grad = ctx.grad, None
        grad_out = grad_out.to(torch.float32)
        vec = grad_out * ctx.vec if ctx.vec is not None else None
        scale_grad_(g, ctx.labels, (grad_out * ctx.inv_n).reshape(1), vec, ctx.ignore_index)
        return g, None, None, None, None, None, None, None, None, None, None, None


# --- Under torch.compile: the same kernels as opaque custom ops (see dist_contrast.py) ------
@torch.library.custom_op("sepico_fast::bank_contrast_forward", mutates_args=())
def _bank_forward_op(feat: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_len: torch.Tensor,
                     temperature: float, mean: torch.Tensor | None, reg_weight: float, ignore_index: int,
                     sort: bool, block_n: int | None, block_a: int | None, write_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂Σℓ/∂z [N, A] when ``write_grad`` else [0, A], 1/n, regulariser gradient vector [A])."""
    loss, grad, inv_n, vec = _launch(feat, labels, bank, bank_len, temperature, mean, reg_weight, ignore_index,
                                     write_grad, sort, block_n, block_a)
    if grad is None:
        grad = feat.new_empty((0, feat.shape[1]))
    if vec is None:
        vec = feat.new_zeros(feat.shape[1], dtype=torch.float32)
    return loss, grad, inv_n, vec


@_bank_forward_op.register_fake
def _(feat, labels, bank, bank_len, temperature, mean, reg_weight, ignore_index, sort, block_n, block_a,
      write_grad):
    n, a = feat.shape
    return (feat.new_empty((), dtype=torch.float32), feat.new_empty((n if write_grad else 0, a)),
            feat.new_empty((), dtype=torch.float32), feat.new_empty((a,), dtype=torch.float32))


@torch.library.custom_op("sepico_fast::bank_contrast_backward", mutates_args=())
def _bank_backward_op(stored: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, vec: torch.Tensor | None,
                      ignore_index: int) -> torch.Tensor:
    """∂L/∂z: a scaled copy of the gradient the forward kernel stored."""
    return scale_grad_(stored.clone(), labels.contiguous(), scale, vec, ignore_index)


@_bank_backward_op.register_fake
def _(stored, labels, scale, vec, ignore_index):
    return torch.empty_like(stored, memory_format=torch.contiguous_format)


def _bank_setup_context(ctx, inputs, output):
    labels, reg_weight, ignore_index = inputs[1], inputs[6], inputs[7]
    _, grad, inv_n, vec = output
    ctx.save_for_backward(grad, labels, inv_n, vec)
    ctx.args = (ignore_index, reg_weight != 0.0)


def _bank_backward(ctx, grad_loss, *_unused):
    stored, labels, inv_n, vec = ctx.saved_tensors
    ignore_index, has_reg = ctx.args
    grad_loss = grad_loss.to(torch.float32)
    g = _bank_backward_op(stored, labels, (grad_loss * inv_n).reshape(1), grad_loss * vec if has_reg else None,
                          ignore_index)
    return (g,) + (None,) * 11


_bank_forward_op.register_autograd(_bank_backward, setup_context=_bank_setup_context)


def _compiled_bank(feat, labels, bank, bank_len, temperature, mean, reg_weight, ignore_index, sort, block_n,
                   block_a, need_grad):
    return _bank_forward_op(feat, labels, bank, bank_len, temperature, mean, reg_weight, ignore_index, sort,
                            block_n, block_a, need_grad)[0]


def bank_contrast_loss(feat: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor,
                       bank_len: torch.Tensor, temperature: float = 100.0,
                       mean: torch.Tensor | None = None, reg_weight: float = 0.0,
                       ignore_index: int = 255, *, sort: bool = True,
                       block_n: int | None = None, block_a: int | None = None) -> torch.Tensor:
    """BankCL of method §5 (see the module docstring); 0-d fp32, differentiable w.r.t. ``feat``.

    feat [N, A], labels [N], bank [C, M, A] with entries 0..bank_len[c]-1 valid, ``mean``
    [C, A] the class means for the regulariser (needed when reg_weight != 0). ``sort=False``
    skips the label argsort (correct, slower on real data); ``block_n``/``block_a`` override
    the tile sizes.
    """
    if reg_weight != 0.0 and mean is None:
        raise ValueError("mean: the class means [C, A] are required when reg_weight != 0")
    check_device(feat, labels, bank, bank_len)
    check_blocks(block_n, block_a)
    apply = _compiled_bank if torch.compiler.is_compiling() else _BankContrastFunction.apply
    return apply(feat, labels, bank, bank_len, float(temperature), mean, float(reg_weight), int(ignore_index),
                 bool(sort), block_n, block_a, _needs_grad(feat))
