"""One SePiCo iteration with the authors' dataflow: the baseline of ``test_bench_train_step``.

Built from this package's modules (same networks, same parameters, same mathematics) but
arranged as the authors' ``SePiCo.forward_train`` + mmcv's optimizer step run it, so that
"fast vs upstream" measures the dataflow and the kernels, not a different model. Each
choice below is the authors' (method §6, §9), noted next to the code:

* float32 only (their code had no mixed precision);
* networks in ``Segmentor.use_upstream_layout()``: ``F.conv2d`` for every convolution,
  explicit attention, contiguous NCHW copies where their code makes them;
* the teacher runs every pass they run: ``encode_decode`` of the weak target image
  (pseudo labels), of the crop (regeneration), of the weak source image (its result only
  feeds debug pictures, it is computed every iteration), and backbone + projection head on
  the weak source image for the statistics: four backbone passes, three decode heads;
* pseudo labels: soft-max of the logits bilinearly resized to the input, the confident
  ratio counted on the host (``.cpu()`` of the label map and ``.item()``);
* class-balanced crop and ClassMix as per-image Python loops with a host sync per try
  (``sepico_fast.ops.upstream``); the mixed images are strongly augmented one by one;
* the statistics update and DistCL as dense N×C×A tensors and separate ops, ignore
  pixels dropped by boolean indexing (``bench/upstream.py``); labels downscaled by a
  one-hot average pool (C+1 channels at input resolution);
* the decode-head losses also compute the pixel accuracy (mmseg's ``acc_seg``) and every
  loss is read on the host for the log (mmseg's ``_parse_losses``);
* AdamW per parameter (``foreach=False, fused=False``; PyTorch 1.7 had no multi-tensor
  path), gradients zeroed in place before the iteration, no non-finite check; the EMA
  teacher updated parameter by parameter.

``tf32_foreach=True`` builds the second baseline, named ``upstream_tf32_foreach`` in the
records: the same dataflow with TF32 matmuls and convolutions
(``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``, set only
while its iteration runs) and the multi-tensor AdamW (``foreach=True``) — what a user of
current PyTorch gets by flipping two switches, so that the fast step's ratio over it is not
one of precision and optimizer loops alone. On the CPU both switches change nothing but the
optimizer.

Only ``variant="dist"`` (DistCL with the regulariser, the configuration measured) and
``method="sepico"`` are implemented. The per-iteration random decisions (jitter, blur)
come from the same ``iteration_rng`` as the fast step, so both take the same branches.
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.upstream import UpstreamStats, drop_ignore, upstream_dist_contrast_loss
from sepico_fast import augment
from sepico_fast.models import build_segmentor, param_groups
from sepico_fast.ops.upstream import upstream_class_balanced_crop, upstream_classmix, upstream_pseudo_label
from sepico_fast.train.config import TrainConfig
from sepico_fast.train.schedule import lr_factor, set_lr
from sepico_fast.train.step import iteration_rng, iteration_seed, seg_ce
from sepico_fast.train.uda import IGNORE, make_teacher

__all__ = ["UpstreamStep", "build_upstream_step", "upstream_train_step"]


@dataclass
class UpstreamStep:
    cfg: TrainConfig
    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    stats: UpstreamStats
    device: torch.device
    banks: list = field(default_factory=list)  # the authors' per-class deques (maxlen 0 for DistCL)
    tf32: bool = False  # the upstream_tf32_foreach baseline: TF32 matmuls/convolutions during the step


def build_upstream_step(cfg: TrainConfig, device: torch.device | str,
                        student: nn.Module | None = None, *, tf32_foreach: bool = False) -> UpstreamStep:
    """Student (built from ``cfg`` unless given, then switched to the upstream layout),
    EMA teacher, per-parameter AdamW with the same parameter groups, dense statistics.
    ``tf32_foreach``: TF32 during the iteration and the foreach AdamW (see the module doc)."""
    if cfg.method != "sepico" or cfg.variant != "dist":
        raise ValueError(f"upstream_step: only method 'sepico' with variant 'dist' is implemented, "
                         f"got {cfg.method!r} / {cfg.variant!r}")
    device = torch.device(device)
    if student is None:
        student = build_segmentor(cfg.arch, cfg.num_classes, cfg.proj_dim,
                                  drop_path_rate=cfg.drop_path_rate).to(device)
    student.use_upstream_layout(True)
    teacher = make_teacher(student)
    groups = param_groups(student, cfg.lr, cfg.weight_decay, cfg.head_lr_mult)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  foreach=bool(tf32_foreach), fused=False)
    banks = [deque(maxlen=0) for _ in range(cfg.num_classes)]
    return UpstreamStep(cfg, student, teacher, optimizer, UpstreamStats(cfg.num_classes, cfg.proj_dim, device),
                        device, banks, tf32=bool(tf32_foreach))


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 matmuls and cuDNN convolutions inside the block (the process's settings restored after)."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------------------
# The authors' small pieces, restated
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def _update_ema(teacher: nn.Module, student: nn.Module, it: int, alpha: float) -> None:
    """Parameter by parameter: copy at 0, else θ_T[:] = α_t θ_T + (1 − α_t) θ_S (two temporaries each)."""
    alpha_t = min(1 - 1 / (it + 1), alpha)
    for ema_p, p in zip(teacher.parameters(), student.parameters()):
        if it == 0:
            ema_p.data[:] = p.data[:].clone()
        else:
            ema_p.data[:] = alpha_t * ema_p[:].data[:] + (1 - alpha_t) * p[:].data[:]


def _encode_decode(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """mmseg ``encode_decode``: backbone, decode head, logits resized to the input size."""
    logits = model.decode(model.extract(img))
    return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=False)


def _downscale_onehot(label: torch.Tensor, scale: int, min_ratio: float, num_classes: int) -> torch.Tensor:
    """method §3 the authors' way: ignore -> C, one-hot to C+1 channels, average pool, arg-max."""
    if scale == 1:
        return label.clone()
    out = label.clone()
    out[out == IGNORE] = num_classes
    onehot = F.one_hot(out.squeeze(1), num_classes=num_classes + 1).permute(0, 3, 1, 2)
    ratio, out = torch.max(F.avg_pool2d(onehot.float(), kernel_size=scale), dim=1, keepdim=True)
    out[out == num_classes] = IGNORE
    out[ratio < min_ratio] = IGNORE
    return out


def _contrast_preparations(feat: torch.Tensor, label: torch.Tensor, cfg: TrainConfig):
    """Downscaled labels, features as a contiguous [N, A] copy, ignore pixels dropped (a host sync)."""
    small = _downscale_onehot(label, label.shape[-1] // feat.shape[-1], cfg.min_ratio, cfg.num_classes).long()
    dim = feat.size(1)
    flat = feat.permute(0, 2, 3, 1).contiguous().view(-1, dim)
    return drop_ignore(flat, small.contiguous().view(-1), IGNORE)


def _accuracy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """mmseg ``accuracy`` (top-1, in percent of all pixels) at the label size, as ``acc_seg``."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.topk(1, dim=1)[1][:, 0]
    return pred.eq(label[:, 0] if label.dim() == 4 else label).float().sum() * (100.0 / label.numel())


def _dist_loss(cfg: TrainConfig, stats: UpstreamStats, proj: torch.Tensor, label: torch.Tensor):
    feat, labels = _contrast_preparations(proj, label, cfg)
    if feat.shape[0] == 0:  # the authors return a fresh 0 that requires grad
        return proj.sum() * 0.0
    return upstream_dist_contrast_loss(feat, labels, stats.mean, stats.var, temperature=cfg.temperature,
                                       ratio=1.0, reg_weight=cfg.reg_weight if cfg.reg_weight > 0 else 0.0)


def _parse_losses(losses: dict, log: dict, prefix: str) -> torch.Tensor:
    """mmseg: total of the 'loss*' entries; every entry read on the host for the log."""
    total = sum(v for k, v in losses.items() if "loss" in k)
    for k, v in losses.items():
        log[f"{prefix}.{k}"] = v.item()
    return total


# ----------------------------------------------------------------------------------------
# The iteration
# ----------------------------------------------------------------------------------------
def upstream_train_step(u: UpstreamStep, src: dict, tgt: dict, it: int) -> dict[str, float]:
    """Iteration ``it`` the authors' way; returns the logged losses as Python floats."""
    with _tf32(u.tf32):
        return _upstream_train_step(u, src, tgt, it)


def _upstream_train_step(u: UpstreamStep, src: dict, tgt: dict, it: int) -> dict[str, float]:
    cfg, student, teacher = u.cfg, u.student, u.teacher
    log: dict[str, float] = {}
    for p in student.parameters():  # PyTorch 1.7 zero_grad: in place, one parameter at a time
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()
    set_lr(u.optimizer, lr_factor(it, cfg.iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.poly_power))
    rng, gen = iteration_rng(cfg.seed, it, 0, u.device)
    np_rng = np.random.default_rng(iteration_seed(cfg.seed, it, 1 << 20))  # their numpy draws
    strong = augment.draw_strong_params(rng, cfg.color_jitter_strength, cfg.color_jitter_p, cfg.blur)

    img, gt = src["img"], src["gt"]
    batch = img.shape[0]
    _update_ema(teacher, student, it, cfg.ema_alpha)
    weak_img, weak_target_img = img.clone(), tgt["img"].clone()

    with torch.no_grad():  # their teacher parameters are detached: no graph either way
        logits = _encode_decode(teacher, weak_target_img)
        _, pseudo_label, q = upstream_pseudo_label(logits, cfg.pseudo_threshold)
        crop_hw = (min(cfg.crop_hw[0], weak_target_img.shape[-2]), min(cfg.crop_hw[1], weak_target_img.shape[-1]))
        weak_target_img, pseudo_label, _ = upstream_class_balanced_crop(
            weak_target_img, pseudo_label, crop_hw, cat_max_ratio=cfg.cat_max_ratio, ignore_index=IGNORE,
            num_tries=cfg.crop_tries, rng=np_rng)
        if cfg.regen_pseudo:
            logits = _encode_decode(teacher, weak_target_img)
            _, pseudo_label, q = upstream_pseudo_label(logits, cfg.pseudo_threshold)
        target_img = weak_target_img.clone()

    img = augment.strong_augment(img, strong, rng, gen)
    target_img = augment.strong_augment(target_img, strong, rng, gen)

    pseudo_weight = q * torch.ones(pseudo_label.shape, device=u.device)
    top, bottom = cfg.ignore_rows()
    if top > 0:
        pseudo_weight[:, :top, :] = 0
    if bottom > 0:
        pseudo_weight[:, -bottom:, :] = 0

    with torch.no_grad():
        src_logits = _encode_decode(teacher, weak_img)  # unused outside debug pictures
        torch.max(torch.softmax(src_logits, dim=1), dim=1)
        src_feat = teacher.project(teacher.extract(weak_img))  # extract_auxiliary_feat
        feat, labels = _contrast_preparations(src_feat, gt.clone(), cfg)
        u.stats.update(feat.detach(), labels)
        for cls in torch.unique(labels):  # their memory-bank push (a host loop)
            u.banks[int(cls)].append(u.stats.mean[int(cls)].unsqueeze(0))

    contrast_on = it >= cfg.contrast_start
    # Source: decode loss (+ contrast from contrast_start) from one backbone pass.
    feats = student.extract(img)
    seg_logits = student.decode(feats)
    losses = {"decode.loss_seg": seg_ce(seg_logits, gt, None, None, cfg.ce_mean_over_all),
              "decode.acc_seg": _accuracy(seg_logits.detach(), gt)}
    if contrast_on:
        losses["aux.loss_cl"] = cfg.contrast_weight * _dist_loss(cfg, u.stats, student.project(feats), gt)
    _parse_losses(losses, log, "src").backward()
    del feats, seg_logits

    if contrast_on:  # target contrast (mode 'aux': backbone + projection head)
        pseudo_lbl = pseudo_label.clone()
        pseudo_lbl[pseudo_weight == 0.0] = IGNORE
        proj = student.project(student.extract(target_img))
        losses = {"aux.loss_cl": cfg.contrast_weight * _dist_loss(cfg, u.stats, proj, pseudo_lbl.unsqueeze(1))}
        _parse_losses(losses, log, "tgt").backward()

    # ClassMix, one sample at a time, each mixed image augmented on its own.
    mixed_img, mixed_lbl, mixed_w, _ = upstream_classmix(weak_img, weak_target_img, gt, pseudo_label,
                                                        pseudo_weight, rng=np_rng)
    mixed_img = torch.cat([augment.strong_augment(mixed_img[i:i + 1], strong, rng, gen) for i in range(batch)])
    seg_logits = student.predict(mixed_img)
    losses = {"decode.loss_seg": seg_ce(seg_logits, mixed_lbl, mixed_w, None, cfg.ce_mean_over_all),
              "decode.acc_seg": _accuracy(seg_logits.detach(), mixed_lbl)}
    _parse_losses(losses, log, "mix").backward()

    u.optimizer.step()
    return log

