"""Fused per-class batch moments for ``ClassStats.update`` (method §4).

Math. For class c with pixel set S_c = {i : y_i = c} (``ignore_index`` and labels outside
[0, C) are skipped):

    count_c = |S_c|,   mean_c = Σ_{S_c} z_i / count_c,   m2_c = Σ_{S_c} (z_i − mean_c)²

(per dimension; mean and m2 are 0 for an absent class). Partial moments of disjoint pixel
sets (k_a, m_a, M2_a), (k_b, m_b, M2_b) combine exactly with Chan's formula

    k = k_a + k_b,   δ = m_b − m_a,   m = m_a + δ k_b/k,   M2 = M2_a + M2_b + δ² k_a k_b / k

so no E[z²] − E[z]² cancellation ever happens.

Kernel 1 (grid G × ⌈A/BLOCK_A⌉): program (g, j) owns columns chunk j and visits row blocks
g, g+G, g+2G, …; for each block it forms the one-hot [BLOCK_N, C_PAD] of the labels and gets
the block's per-class sums as one tensor-core product onehotᵀ·z, the block means, the
centred residuals z − onehot·mean_b and their squares' per-class sums onehotᵀ·(z − m_b)²
(two more small products), then Chan-merges the block into its register-resident running
moments. It reads z exactly once and writes fp32 partials [G, C, A] (no atomics).
Kernel 2 Chan-merges the G partials in the fixed order g = 0, 1, …, G−1.

Determinism: G depends only on N and A (never on the device), every reduction has a fixed
order and no atomics are used, so results are bitwise reproducible run to run and across
GPUs of the same architecture; ``deterministic=True`` is therefore the default behaviour and
the flag changes nothing.

Precision: the sums onehotᵀ·z are exact products with fp32 accumulation (fp16/bf16 features
are exact in their own dtype; fp32 features use 3xTF32). The centring and squared-residual
products use 3xTF32 for fp32 features and TF32 for half features (≈5e-4 relative on m2 —
below the half-precision rounding of the features themselves).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_blocks, check_device, dot_dtype, dot_precision, launch, pow2_at_least

_TARGET_PROGRAMS = 256  # device-independent so that the reduction tree never changes


@triton.jit
def _class_moments_partial_kernel(
    z_ptr, lab_ptr, cnt_part_ptr, mean_part_ptr, m2_part_ptr,
    N, A, C, stride_zn, stride_za, ignore_index, num_groups,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, C_PAD: tl.constexpr,
    SUM_DTYPE: tl.constexpr, SUM_PREC: tl.constexpr, SQ_PREC: tl.constexpr,
):
    grp = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_A + tl.arange(0, BLOCK_A)
    col_in = cols < A
    cls = tl.arange(0, C_PAD)
    cls_in = cls < C

    run_cnt = tl.zeros([C_PAD], dtype=tl.float32)
    run_mean = tl.zeros([C_PAD, BLOCK_A], dtype=tl.float32)
    run_m2 = tl.zeros([C_PAD, BLOCK_A], dtype=tl.float32)
    num_blocks = tl.cdiv(N, BLOCK_N)
    for blk in range(grp, num_blocks, num_groups):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        row_in = rows < N
        y = tl.load(lab_ptr + rows, mask=row_in, other=ignore_index).to(tl.int32)
        keep = row_in & (y != ignore_index)
        onehot = (keep[:, None] & (cls[None, :] == y[:, None])).to(tl.float32)  # [BN, C_PAD]
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_zn + cols[None, :] * stride_za,
                    mask=keep[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        onehot_t = tl.trans(onehot)  # [C_PAD, BN]
        blk_cnt = tl.sum(onehot, axis=0)
        blk_sum = tl.dot(onehot_t.to(SUM_DTYPE), z.to(SUM_DTYPE), input_precision=SUM_PREC)
        blk_mean = blk_sum / tl.maximum(blk_cnt, 1.0)[:, None]
        resid = z - tl.dot(onehot, blk_mean, input_precision=SQ_PREC)  # z_i − mean_b[y_i]
        blk_m2 = tl.dot(onehot_t, resid * resid, input_precision=SQ_PREC)
        # Chan merge of the block into the running moments
        tot = run_cnt + blk_cnt
        frac = (blk_cnt / tl.maximum(tot, 1.0))[:, None]
        delta = blk_mean - run_mean
        run_mean += delta * frac
        run_m2 += blk_m2 + delta * delta * (run_cnt[:, None] * frac)
        run_cnt = tot

    base = grp.to(tl.int64) * C
    st_mask = cls_in[:, None] & col_in[None, :]
    offs = (base + cls[:, None]) * A + cols[None, :]
    tl.store(mean_part_ptr + offs, run_mean, mask=st_mask)
    tl.store(m2_part_ptr + offs, run_m2, mask=st_mask)
    if chunk == 0:  # every column chunk has the same counts
        tl.store(cnt_part_ptr + base + cls, run_cnt, mask=cls_in)


@triton.jit
def _class_moments_merge_kernel(
    cnt_part_ptr, mean_part_ptr, m2_part_ptr, cnt_ptr, mean_ptr, m2_ptr, C, A, num_groups,
    BLOCK: tl.constexpr,
):
    """Chan-merge partials [G, C, A] in the order g = 0..G−1 into count [C], mean, m2 [C, A]."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = C * A
    in_range = idx < total
    c = idx // A
    cnt = tl.zeros([BLOCK], dtype=tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for g in range(0, num_groups):
        k_b = tl.load(cnt_part_ptr + g * C + c, mask=in_range, other=0.0)
        off = g * total + idx
        m_b = tl.load(mean_part_ptr + off, mask=in_range, other=0.0)
        s_b = tl.load(m2_part_ptr + off, mask=in_range, other=0.0)
        tot = cnt + k_b
        frac = k_b / tl.maximum(tot, 1.0)
        delta = m_b - mean
        mean += delta * frac
        m2 += s_b + delta * delta * cnt * frac
        cnt = tot
    tl.store(mean_ptr + idx, mean, mask=in_range)
    tl.store(m2_ptr + idx, m2, mask=in_range)
    tl.store(cnt_ptr + c, cnt, mask=in_range & (idx % A == 0))


def kernel_config(feat_dtype: torch.dtype, a: int, c: int, *, block_n: int | None = None,
                  block_a: int | None = None) -> dict:
    """Compile-time parameters of :func:`_class_moments_partial_kernel`.

    Chosen to compile for sm_90 without register spills (ptxas -v): half features 64-row
    blocks × 32 columns, fp32 features 32 × 64; 4 warps. Not tuned on hardware.
    """
    sum_dtype = dot_dtype(feat_dtype)
    half = sum_dtype != tl.float32
    return dict(BLOCK_N=block_n or (64 if half else 32),
                BLOCK_A=block_a or min(32 if half else 64, pow2_at_least(a)),
                C_PAD=pow2_at_least(c), SUM_DTYPE=sum_dtype, SUM_PREC=dot_precision(sum_dtype),
                SQ_PREC="tf32" if half else "tf32x3", num_warps=4)


def class_moments(feat: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  ignore_index: int = 255, deterministic: bool = False, *,
                  block_n: int | None = None, block_a: int | None = None,
                  num_groups: int | None = None):
    """count [C], mean [C, A], m2 [C, A] (fp32) of one batch; see the module docstring.

    feat [N, A] fp32/fp16/bf16 (any strides), labels [N] integer. ``deterministic`` is
    accepted for the contract; the result is deterministic either way. ``block_n``,
    ``block_a`` and ``num_groups`` (G) override the launcher's choices (tests use them).
    """
    check_device(feat, labels)
    check_blocks(block_n, block_a)
    n_rows, a = feat.shape
    c = int(num_classes)
    dev = feat.device
    count = torch.zeros(c, device=dev, dtype=torch.float32)
    mean = torch.zeros(c, a, device=dev, dtype=torch.float32)
    m2 = torch.zeros(c, a, device=dev, dtype=torch.float32)
    if n_rows == 0 or a == 0 or c == 0:
        return count, mean, m2
    labels = labels.contiguous()
    cfg = kernel_config(feat.dtype, a, c, block_n=block_n, block_a=block_a)
    chunks = triton.cdiv(a, cfg["BLOCK_A"])
    num_blocks = triton.cdiv(n_rows, cfg["BLOCK_N"])
    groups = num_groups or max(1, _TARGET_PROGRAMS // chunks)
    groups = max(1, min(groups, num_blocks))
    cnt_part = torch.empty(groups, c, device=dev, dtype=torch.float32)
    mean_part = torch.empty(groups, c, a, device=dev, dtype=torch.float32)
    m2_part = torch.empty(groups, c, a, device=dev, dtype=torch.float32)
    block = 512
    launch(_class_moments_partial_kernel, (groups, chunks), feat,
           feat, labels, cnt_part, mean_part, m2_part, n_rows, a, c, feat.stride(0),
           feat.stride(1), int(ignore_index), groups, **cfg)
    launch(_class_moments_merge_kernel, (triton.cdiv(c * a, block),), feat,
           cnt_part, mean_part, m2_part, count, mean, m2, c, a, groups, BLOCK=block, num_warps=4)
    return count, mean, m2
