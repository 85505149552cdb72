"""The three pixel-contrast losses of SePiCo (method §5) with the shared regulariser.

Public functions validate their arguments (``labels_checked=True``: labels made by
``prepare_contrast``, whose values were checked there, skip the repeated value check)
and dispatch on ``impl``; the ``*_torch``
functions are the reference implementations in plain PyTorch. Conventions shared by
all three (z_i = feat[i], y_i = labels[i], τ = temperature, V = pixels whose label is
not ``ignore_index``):

* loss = mean_{i∈V} ℓ_i + reg_weight · r · [V non-empty], with
  r = Σ_c log softmax_c(z̄·μ_c/τ) / (C ln C) and z̄ = mean_{i∈V} z_i (method §5). The
  upstream runs add r with weight +1 (quirk: it pushes z̄ *away* from a uniform class
  assignment); a negative ``reg_weight`` gives the opposite, "as described" sign.
* With no valid pixel (N = 0 included) the loss is an exact 0 that is still connected
  to ``feat``: backward yields zero gradients, never NaN.
* The result is a 0-d float32 tensor. Math runs in float32 (float64 for float64
  inputs), with autocast disabled so half-precision inputs are upcast, not the reverse.
  Features at ignored pixels are never read into the loss (their gradient is 0 even
  if they hold NaN).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..dispatch import resolve_impl
from .validation import (
    check_features,
    check_labels,
    check_scalar,
    check_statistic,
    check_value,
    triton_kernel,
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid_rows(feat: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Features (ignored rows zeroed, compute dtype), safe labels, validity mask and count."""
    valid = labels != ignore_index
    x = torch.where(valid[:, None], feat.to(_compute_dtype(feat.dtype)), 0.0)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    num_valid = valid.sum().to(x.dtype)
    return x, y, valid, num_valid


def regulariser(x: torch.Tensor, num_valid: torch.Tensor, mean: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """r = Σ_c log softmax_c(z̄·μ_c/τ) / (C ln C), z̄ the mean of the valid rows of ``x``.

    ``x`` has its ignored rows zeroed, so z̄ = Σ_i x_i / |V|. Returns 0 when |V| = 0.
    """
    num_classes = mean.shape[0]
    z_bar = x.sum(0) / num_valid.clamp_min(1.0)
    log_prob = F.log_softmax(mean @ z_bar / temperature, dim=0)
    r = log_prob.sum() / (num_classes * math.log(num_classes))
    return r * (num_valid > 0).to(r.dtype)


def _finish(ce_sum: torch.Tensor, count: torch.Tensor, reg: torch.Tensor | None,
            reg_weight: float) -> torch.Tensor:
    loss = ce_sum / count.clamp_min(1.0)
    if reg is not None and reg_weight != 0.0:
        loss = loss + reg_weight * reg
    return loss


# --------------------------------------------------------------------------- references

def proto_contrast_loss_torch(feat, labels, mean, temperature=100.0, reg_weight=0.0,
                              ignore_index=255):
    """ProtoCL: ℓ_i = −log softmax_c(z_i·μ_c/τ)[y_i] = logsumexp_c(z_i·μ_c/τ) − z_i·μ_{y_i}/τ."""
    with torch.autocast(feat.device.type, enabled=False):
        x, y, valid, num_valid = _valid_rows(feat, labels, ignore_index)
        mu = mean.to(x.dtype)
        logits = x @ mu.t() / temperature  # [N, C]
        per_pixel = torch.logsumexp(logits, 1) - logits.gather(1, y[:, None])[:, 0]
        ce_sum = torch.where(valid, per_pixel, 0.0).sum()
        reg = regulariser(x, num_valid, mu, temperature) if reg_weight else None
        return _finish(ce_sum, num_valid, reg, reg_weight)


def dist_contrast_loss_torch(feat, labels, mean, var, temperature=100.0, ratio=1.0,
                             reg_weight=0.0, ignore_index=255):
    """DistCL: ℓ_i = −z_i·μ_{y_i}/τ + logsumexp_c s_ic,
    s_ic = (z_i·μ_c + ½ λ Σ_a z_ia² σ²_ca / τ) / τ   (λ = ``ratio``).

    This is −log softmax(s_i)[y_i] + ½ λ Σ_a z_ia² σ²_{y_i a} / τ² with the positive
    class's variance term cancelled algebraically, so σ²_{y_i} is never gathered.
    Two [N,A] x [A,C] matmuls, nothing of size N x C x A.
    """
    with torch.autocast(feat.device.type, enabled=False):
        x, y, valid, num_valid = _valid_rows(feat, labels, ignore_index)
        mu, sigma2 = mean.to(x.dtype), var.to(x.dtype)
        dot = x @ mu.t()  # [N, C]
        spread = (x * x) @ sigma2.t()  # [N, C]: Σ_a z_ia² σ²_ca
        s = (dot + (0.5 * ratio / temperature) * spread) / temperature
        per_pixel = torch.logsumexp(s, 1) - dot.gather(1, y[:, None])[:, 0] / temperature
        ce_sum = torch.where(valid, per_pixel, 0.0).sum()
        reg = regulariser(x, num_valid, mu, temperature) if reg_weight else None
        return _finish(ce_sum, num_valid, reg, reg_weight)


def bank_contrast_loss_torch(feat, labels, bank, bank_len, temperature=100.0, mean=None,
                             reg_weight=0.0, ignore_index=255):
    """BankCL: for pixel i of class y with valid bank rows b_1..b_P (P = bank_len[y]),

        n_ik = z_i·b̄_k/τ          b̄_k = mean of class k's valid bank rows
        ℓ_i  = mean_j [ log(e^{p_ij} + Σ_{k≠y, P_k>0} e^{n_ik}) − p_ij ],  p_ij = z_i·b_j/τ

    Classes with an empty bank are left out of the negatives; a pixel whose own class
    has an empty bank has no positive and is left out of the mean (it counts as
    neither valid nor invalid for the CE part, but is still part of z̄ for the
    regulariser). The mean similarity is a dot with the mean bank row, so negatives
    cost one [N,A] x [A,C] matmul. The positives are z_i·b_{y_i j}: computed per class
    (C matmuls of [N,A] x [A,M]), so memory stays O(N·M), never N x M x C.
    """
    with torch.autocast(feat.device.type, enabled=False):
        x, y, valid, num_valid = _valid_rows(feat, labels, ignore_index)
        num_classes, length, _ = bank.shape
        b = bank.to(x.dtype)
        bank_len = bank_len.long()
        slot = torch.arange(length, device=x.device)
        entry_ok = slot[None, :] < bank_len[:, None]  # [C, M]
        has_bank = bank_len > 0  # [C]
        bank_mean = (b * entry_ok[..., None]).sum(1) / bank_len.clamp_min(1)[:, None].to(x.dtype)

        neg = x @ bank_mean.t() / temperature  # [N, C]
        neg_ok = has_bank[None, :] & (torch.arange(num_classes, device=x.device)[None, :] != y[:, None])
        any_neg = neg_ok.any(1)
        # logsumexp over the allowed negatives; rows without any get −inf, computed on a
        # finite stand-in so that the backward pass stays NaN-free.
        neg_masked = torch.where(neg_ok, neg, float("-inf"))
        neg_masked = torch.where(any_neg[:, None], neg_masked, 0.0)
        log_neg = torch.where(any_neg, torch.logsumexp(neg_masked, 1), float("-inf"))

        pos = x.new_zeros(x.shape[0], length)  # p_ij = z_i·b_{y_i j}/τ
        for c in range(num_classes):
            pos = torch.where((y == c)[:, None], x @ b[c].t() / temperature, pos)
        pos_ok = entry_ok[y]  # [N, M]
        per_entry = torch.logaddexp(pos, log_neg[:, None]) - pos
        own_len = bank_len[y].to(x.dtype)
        per_pixel = torch.where(pos_ok, per_entry, 0.0).sum(1) / own_len.clamp_min(1.0)
        counted = valid & (own_len > 0)
        ce_sum = torch.where(counted, per_pixel, 0.0).sum()
        reg = regulariser(x, num_valid, mean.to(x.dtype), temperature) if reg_weight else None
        return _finish(ce_sum, counted.sum().to(x.dtype), reg, reg_weight)


# ------------------------------------------------------------------------------ public API

def _check_common(feat, labels, num_classes, ignore_index, temperature, reg_weight, labels_checked=False):
    check_features(feat)
    check_labels(labels, feat, num_classes, ignore_index, values=not labels_checked)
    temperature = check_scalar(temperature, "temperature", positive=True)
    reg_weight = check_scalar(reg_weight, "reg_weight")
    if reg_weight != 0.0 and num_classes < 2:
        raise ValueError("the regulariser needs at least 2 classes (it divides by C ln C)")
    return temperature, reg_weight


def _as_float32_scalar(loss: torch.Tensor) -> torch.Tensor:
    return loss.to(torch.float32).reshape(())


def proto_contrast_loss(feat, labels, mean, *, temperature=100.0, reg_weight=0.0,
                        ignore_index=255, impl=None, labels_checked=False):
    """ProtoCL loss (method §5), 0-d float32. ``mean [C,A]`` are the class means μ."""
    check_features(feat)
    check_statistic(mean, "mean", feat)
    temperature, reg_weight = _check_common(feat, labels, mean.shape[0], ignore_index,
                                            temperature, reg_weight, labels_checked)
    impl = resolve_impl("proto_contrast_loss", impl, feat.device, dtype=feat.dtype)
    if impl == "triton":
        fn = triton_kernel("proto_contrast_loss")
        return _as_float32_scalar(fn(feat, labels, mean, temperature, reg_weight, ignore_index))
    return _as_float32_scalar(proto_contrast_loss_torch(feat, labels, mean, temperature,
                                                        reg_weight, ignore_index))


def dist_contrast_loss(feat, labels, mean, var, *, temperature=100.0, ratio=1.0, reg_weight=0.0,
                       ignore_index=255, impl=None, labels_checked=False):
    """DistCL loss (method §5), 0-d float32. ``mean, var [C,A]``: class means μ and diagonal
    variances σ²; ``ratio`` is λ."""
    check_features(feat)
    check_statistic(mean, "mean", feat)
    check_statistic(var, "var", feat, shape=tuple(mean.shape))
    ratio = check_scalar(ratio, "ratio")
    temperature, reg_weight = _check_common(feat, labels, mean.shape[0], ignore_index,
                                            temperature, reg_weight, labels_checked)
    impl = resolve_impl("dist_contrast_loss", impl, feat.device, dtype=feat.dtype)
    if impl == "triton":
        fn = triton_kernel("dist_contrast_loss")
        return _as_float32_scalar(fn(feat, labels, mean, var, temperature, ratio, reg_weight,
                                     ignore_index))
    return _as_float32_scalar(dist_contrast_loss_torch(feat, labels, mean, var, temperature, ratio,
                                                       reg_weight, ignore_index))


def bank_contrast_loss(feat, labels, bank, bank_len, *, temperature=100.0, mean=None,
                       reg_weight=0.0, ignore_index=255, impl=None, labels_checked=False):
    """BankCL loss (method §5), 0-d float32. ``bank [C,M,A]`` with ``bank_len [C]`` valid rows
    per class (rows 0..bank_len-1); ``mean [C,A]`` (the class means) is only used by the
    regulariser and is required when ``reg_weight != 0``."""
    check_features(feat)
    if not isinstance(bank, torch.Tensor) or bank.dim() != 3 or bank.shape[2] != feat.shape[1]:
        got = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
        raise ValueError(f"bank must be a [C, M, A] tensor with A = feat.shape[1] = {feat.shape[1]}, "
                         f"got {got}")
    num_classes, length = bank.shape[0], bank.shape[1]
    if not bank.is_floating_point():
        raise ValueError(f"bank must be a floating tensor, got dtype {bank.dtype}")
    if bank.device != feat.device:
        raise ValueError(f"bank is on {bank.device} but feat is on {feat.device}")
    if bank.numel():
        check_value(torch.isfinite(bank), "bank contains NaN or Inf")
    if not isinstance(bank_len, torch.Tensor) or tuple(bank_len.shape) != (num_classes,):
        got = tuple(bank_len.shape) if isinstance(bank_len, torch.Tensor) else type(bank_len).__name__
        raise ValueError(f"bank_len must be a [C] = [{num_classes}] tensor, got {got}")
    if bank_len.dtype.is_floating_point or bank_len.dtype.is_complex or bank_len.dtype == torch.bool:
        raise ValueError(f"bank_len must be an integer tensor, got dtype {bank_len.dtype}")
    if bank_len.device != feat.device:
        raise ValueError(f"bank_len is on {bank_len.device} but feat is on {feat.device}")
    if num_classes:
        check_value((bank_len >= 0) & (bank_len <= length),
                    f"bank_len must hold values in 0..{length} (the bank's M)")
    temperature, reg_weight = _check_common(feat, labels, num_classes, ignore_index,
                                            temperature, reg_weight, labels_checked)
    if mean is not None:
        check_statistic(mean, "mean", feat, shape=(num_classes, feat.shape[1]))
    elif reg_weight != 0.0:
        raise ValueError("bank_contrast_loss: reg_weight != 0 needs mean= (the class means μ "
                         "used by the regulariser)")
    impl = resolve_impl("bank_contrast_loss", impl, feat.device, dtype=feat.dtype)
    if impl == "triton":
        fn = triton_kernel("bank_contrast_loss")
        return _as_float32_scalar(fn(feat, labels, bank, bank_len, temperature, mean, reg_weight,
                                     ignore_index))
    return _as_float32_scalar(bank_contrast_loss_torch(feat, labels, bank, bank_len, temperature,
                                                       mean, reg_weight, ignore_index))
