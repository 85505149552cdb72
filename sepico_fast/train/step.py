"""One SePiCo training iteration (method §6), readable top to bottom: ``train_step``.

Upstream semantics without upstream waste:

* the teacher runs once per distinct input: weak source (backbone + projection head
  only, for the class statistics), weak target (pseudo labels), target crop
  (regenerated pseudo labels; skipped when the crop is the whole image);
* the student runs its backbone once per input and feeds both heads;
* nothing here reads a tensor on the host: losses stay device tensors, the pseudo-label
  weight q is a 0-d tensor, the crop window and ClassMix classes are chosen on the
  device, and a non-finite gradient skips the optimizer step through the fused AdamW
  ``found_inf`` flag instead of a Python ``if``;
* randomness is a pure function of (seed, iteration, rank) (``iteration_rng``), so a
  resumed run replays the same iteration exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import augment, ops
from ..contrast import (
    ClassStats,
    bank_contrast_loss,
    dist_contrast_loss,
    load_triton_kernels,
    prepare_contrast,
    proto_contrast_loss,
)
from ..device import autocast
from .config import TrainConfig
from .profiling import Profiler
from .schedule import lr_factor, set_lr
from .uda import IGNORE, ema_update, fuse_day_night, probs_to_pseudo, pseudo_weight_map, resize_logits


@dataclass
class StepContext:
    """Everything ``train_step`` touches, built once by the runner."""
    cfg: TrainConfig
    student: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    stats: ClassStats | None
    device: torch.device
    amp_dtype: torch.dtype | None = None              # None: float32
    scaler: torch.amp.GradScaler | None = None        # fp16 only
    class_weight: torch.Tensor | None = None          # Dark Zurich CE / fusion weights
    process_group: object = None                      # DDP: gradients and statistics
    world_size: int = 1
    rank: int = 0
    profiler: Profiler | None = None
    student_params: list = field(default_factory=list)
    teacher_params: list = field(default_factory=list)
    skipped: torch.Tensor | None = None               # device counter of skipped steps
    found_inf: torch.Tensor | None = None             # device 0-d flag fed to fused AdamW
    pseudo_diag: object = None                        # --pseudo-diagnostics (train/pseudo_diagnostics.py)
    static: object = None                             # --cuda-graphs: graphs.StaticInputs (graph-ready step)
    passes: object = None                             # the model passes with their losses (ModelPasses)

    def __post_init__(self):
        self.student_params = [p for p in self.student.parameters()]
        if self.teacher is not None:
            self.teacher_params = [p for p in self.teacher.parameters()]
        self.skipped = torch.zeros((), dtype=torch.float32, device=self.device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.profiler is None:
            self.profiler = Profiler(profile=False, nvtx=False, device=self.device, out_dir=".")
        if self.passes is None:
            self.passes = ModelPasses()


# ----------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------
def iteration_seed(seed: int, it: int, rank: int = 0) -> int:
    """A 63-bit seed unique to (seed, iteration, rank)."""
    return random.Random(f"sepico/{seed}/{it}/{rank}").getrandbits(63)


def iteration_rng(seed: int, it: int, rank: int, device: torch.device):
    """Host RNG (per-iteration decisions, blur σ) and device generator (jitter factors,
    crop windows, ClassMix classes); also reseeds torch's global RNG (student dropout,
    drop-path) so that resuming at ``it`` replays the same draws."""
    s = iteration_seed(seed, it, rank)
    torch.manual_seed(s)
    gen = torch.Generator(device=device)
    gen.manual_seed(s)
    return random.Random(s), gen


def seg_ce(logits: torch.Tensor, label: torch.Tensor, pixel_weight: torch.Tensor | None = None,
           class_weight: torch.Tensor | None = None, mean_over_all: bool = True) -> torch.Tensor:
    """Cross-entropy after bilinear upsampling to the label size, in fp32.

    Averaged over *all* pixels including ignored ones (mmseg 0.16 quirk) unless
    ``mean_over_all`` is False (then over non-ignored pixels).
    """
    lbl = label[:, 0] if label.dim() == 4 else label
    logits = resize_logits(logits, tuple(lbl.shape[-2:])).float()
    loss = F.cross_entropy(logits, lbl, weight=class_weight, ignore_index=IGNORE, reduction="none")
    if pixel_weight is not None:
        loss = loss * (pixel_weight[:, 0] if pixel_weight.dim() == 4 else pixel_weight)
    if mean_over_all:
        return loss.mean()
    return loss.sum() / (lbl != IGNORE).sum().clamp_min(1)


def contrast_loss(cfg: TrainConfig, stats: ClassStats, proj: torch.Tensor, label: torch.Tensor):
    """ProtoCL / DistCL / BankCL of projection features against the class statistics."""
    feat, labels = prepare_contrast(proj, label, min_ratio=cfg.min_ratio, num_classes=cfg.num_classes,
                                    ignore_index=IGNORE)
    common = dict(temperature=cfg.temperature, reg_weight=cfg.reg_weight, ignore_index=IGNORE,
                  labels_checked=True)  # checked by prepare_contrast
    if cfg.variant == "dist":
        return dist_contrast_loss(feat, labels, stats.mean, stats.var, ratio=1.0, **common)
    if cfg.variant == "proto":
        return proto_contrast_loss(feat, labels, stats.mean, **common)
    return bank_contrast_loss(feat, labels, stats.bank, stats.bank_len, mean=stats.mean, **common)


def _autocast(ctx: StepContext):
    # A captured CUDA graph must not reuse autocast's cast cache (PyTorch's CUDA-graph notes).
    return autocast(ctx.device, ctx.amp_dtype, cache_enabled=ctx.static is None)


def _augment(ctx: StepContext, img, strong, rng, gen, rows: slice, per_image: bool = False):
    """Strong augmentation: drawn on the host (eager) or from ``ctx.static`` (--cuda-graphs, which
    always makes one HSV round trip per op, as kornia: ``--fused-jitter`` applies to eager steps)."""
    if ctx.static is None:
        return augment.strong_augment(img, strong, rng, gen, per_image=per_image, fused_jitter=ctx.cfg.fused_jitter)
    return augment.static_augment(img, ctx.static, ctx.static.orders[rows], ctx.cfg.color_jitter_strength,
                          ctx.cfg.blur, per_image=per_image)


def _backward(ctx: StepContext, loss: torch.Tensor, accumulate: bool = False) -> None:
    """``loss.backward()``; with ``accumulate`` (the second and third backward pass of the
    iteration) the gradients already held are added to the new ones in one
    ``_foreach_add_`` instead of autograd's one ``add_`` per parameter (~1,000 launches
    for MiT-B5). Same sum in the same order (held + new), one extra gradient set in
    memory while the pass runs."""
    scaled = ctx.scaler.scale(loss) if ctx.scaler is not None else loss
    if not accumulate:
        scaled.backward()
        return
    params = ctx.student_params
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    scaled.backward()
    acc, new = [], []
    for p, g in zip(params, held):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            acc.append(g)
            new.append(p.grad)
            p.grad = g
    if acc:
        torch._foreach_add_(acc, new)


# ----------------------------------------------------------------------------------------
# The model passes with their losses: what ``--compile`` compiles, one graph each
# ----------------------------------------------------------------------------------------
def teacher_pseudo_labels(ctx: StepContext, img: torch.Tensor, ref_img: torch.Tensor | None):
    """Teacher → softmax → (p, ŷ, q); Dark Zurich fuses the day (ref) and night predictions.

    Without a day image ``ops.pseudo_label`` does softmax + max: on CUDA one pass over the
    (16-bit) logits, without the fp32 copy and the softmax tensor; elsewhere the same torch
    code as before. The fusion needs the probabilities themselves."""
    cfg, teacher = ctx.cfg, ctx.teacher
    size = tuple(img.shape[-2:])
    with _autocast(ctx):
        night_logits = resize_logits(teacher.predict(img), size)
        if ref_img is None:
            return ops.pseudo_label(night_logits, cfg.pseudo_threshold)
        night = torch.softmax(night_logits.float(), dim=1)
        day = torch.softmax(resize_logits(teacher.predict(ref_img), size).float(), dim=1)
    fused = fuse_day_night(day, night, ctx.class_weight, cfg.day_ratio)
    return probs_to_pseudo(fused, cfg.pseudo_threshold)


def teacher_source_features(ctx: StepContext, img: torch.Tensor):
    """Teacher backbone features and projection of the weak source image (class statistics)."""
    with _autocast(ctx):
        feats = ctx.teacher.extract(img)
        return feats, ctx.teacher.project(feats)


def student_source_loss(ctx: StepContext, img: torch.Tensor, gt: torch.Tensor,
                        class_weight: torch.Tensor | None, contrast_on: bool):
    """Student on the strong source image: (seg CE [+ λ·contrast], seg CE, contrast or None)."""
    cfg, student = ctx.cfg, ctx.student
    with _autocast(ctx):
        feats = student.extract(img)
        ce = seg_ce(student.decode(feats), gt, None, class_weight, cfg.ce_mean_over_all)
        if not contrast_on:
            return ce, ce, None
        cl = contrast_loss(cfg, ctx.stats, student.project(feats), gt)
        return ce + cfg.contrast_weight * cl, ce, cl


def student_target_loss(ctx: StepContext, img: torch.Tensor, plabel: torch.Tensor, pweight: torch.Tensor):
    """λ · contrast of the strong target crop against ŷ, ignored where the pseudo weight is 0."""
    cfg, student = ctx.cfg, ctx.student
    label = torch.where(pweight == 0, torch.full_like(plabel, IGNORE), plabel).unsqueeze(1)
    with _autocast(ctx):
        return cfg.contrast_weight * contrast_loss(cfg, ctx.stats, student.project(student.extract(img)), label)


def student_mix_loss(ctx: StepContext, img: torch.Tensor, label: torch.Tensor, weight: torch.Tensor,
                     class_weight: torch.Tensor | None):
    """Weighted seg CE of the student on the (strongly augmented) ClassMix image."""
    student = ctx.student
    with _autocast(ctx):
        # extract + decode rather than ``predict``, which --compile compiles on its own for evaluation
        return seg_ce(student.decode(student.extract(img)), label, weight, class_weight, ctx.cfg.ce_mean_over_all)


class ModelPasses:
    """The five model passes of an iteration, each a function ``(ctx, tensors…)``: the plain
    functions above, or (``--compile``, :func:`compile_passes`) their ``torch.compile``d
    versions. Each pass, forward and backward, is then one graph per input shape and grad
    mode, with no graph break (tests/test_train_compile.py); what lies between the passes
    (EMA, crop choice, statistics update, augmentation, ClassMix, optimizer) stays eager."""
    NAMES = ("teacher_labels", "teacher_source", "student_source", "student_target", "student_mix")

    def __init__(self, wrap=None):
        fns = (teacher_pseudo_labels, teacher_source_features, student_source_loss, student_target_loss,
               student_mix_loss)
        for name, fn in zip(self.NAMES, fns):
            setattr(self, name, wrap(fn) if wrap is not None else fn)


def compile_passes(ctx: StepContext, backend="inductor", options: dict | None = None) -> None:
    """``--compile``: each model pass with its loss becomes one compiled graph (``dynamic=False``:
    the shapes are static, so each pass compiles once per input shape and grad mode and
    never again: the source pass once before and once after contrast start)."""
    load_triton_kernels()  # imported here, not while dynamo traces (an import is a graph break)
    ctx.passes = ModelPasses(lambda fn: torch.compile(fn, dynamic=False, backend=backend, options=options))


def allreduce_grads(ctx: StepContext, flag: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average gradients over ranks in one flat all-reduce (three backward passes have
    accumulated into .grad; DDP's reducer expects one forward per backward, see ddp.py).

    ``flag`` (0-d, 0 or 1) rides along in the same all-reduce: the result is > 0 on every
    rank when it was 1 on any rank (no extra collective, no host sync)."""
    grads = [p.grad for p in ctx.student_params if p.grad is not None]
    if not grads and flag is None:
        return None
    extra = [flag.reshape(1).to(grads[0].dtype if grads else torch.float32)] if flag is not None else []
    flat = torch._utils._flatten_dense_tensors(grads + extra)
    dist.all_reduce(flat, group=ctx.process_group)
    flat.div_(ctx.world_size)
    if grads:
        averaged = torch._utils._unflatten_dense_tensors(flat[:flat.numel() - len(extra)], grads)
        torch._foreach_copy_(grads, list(averaged))
    return flat[-1] if extra else None


def optimizer_step(ctx: StepContext, losses: dict[str, torch.Tensor]) -> None:
    """One AdamW step; skipped on the device when a gradient (or, with fp16, a loss) is not finite.

    The skipped-step counter is the same on every rank: without a GradScaler it counts the
    found_inf of the all-reduced gradients; with one (fp16) it counts non-finite losses of
    ANY rank (the local flag is folded into the gradient all-reduce), so every rank stops at
    ``--max-skipped-steps`` together instead of one leaving the others in a collective.
    """
    opt = ctx.optimizer
    bad_loss = None
    if ctx.scaler is not None:
        total = torch.stack([v.float() for v in losses.values()]).sum()
        bad_loss = (~torch.isfinite(total)).float()
    if ctx.world_size > 1:
        bad_loss = allreduce_grads(ctx, bad_loss)
    if ctx.scaler is not None:
        # GradScaler feeds its own found_inf / grad_scale to the fused AdamW (no host sync).
        ctx.scaler.step(opt)
        ctx.scaler.update()
        ctx.skipped.add_((bad_loss > 0).float())
    else:
        grads = [p.grad for p in ctx.student_params if p.grad is not None]
        ctx.found_inf.zero_()
        if grads:
            one = torch.ones((), device=ctx.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, ctx.found_inf, one)
        opt.found_inf = ctx.found_inf
        opt.grad_scale = None
        opt.step()
        ctx.skipped.add_(ctx.found_inf)
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------
# The iteration
# ----------------------------------------------------------------------------------------
def train_step(ctx: StepContext, src: dict, tgt: dict, it: int, debug: bool = False) -> dict:
    """Run iteration ``it`` (0-based) on one source and one target batch.

    Returns ``{"losses": {name: 0-d device tensor}, "debug": {...} or None}``. Losses are
    detached and never read here.
    """
    cfg, phase, run = ctx.cfg, ctx.profiler.phase, ctx.passes
    teacher, stats = ctx.teacher, ctx.stats
    uda = cfg.method == "sepico"
    contrast_on = uda and it >= cfg.contrast_start
    losses: dict[str, torch.Tensor] = {}
    vis: dict | None = {} if debug else None
    if ctx.static is None:
        rng, gen = iteration_rng(cfg.seed, it, ctx.rank, ctx.device)
        set_lr(ctx.optimizer, lr_factor(it, cfg.iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.poly_power))
    else:  # --cuda-graphs: seeds, decisions and lr written by StaticInputs.prepare (train/graphs.py)
        rng, gen = None, ctx.static.generator

    img_s, gt_s = src["img"], src["gt"]                      # weak source [B,3,h,w], [B,1,h,w]
    img_t, ref_t = tgt.get("img"), tgt.get("ref_img")        # weak target (full image), DZ day image
    strong = (augment.draw_strong_params(rng, cfg.color_jitter_strength, cfg.color_jitter_p, cfg.blur)
              if ctx.static is None else None)
    class_weight = ctx.class_weight if cfg.dark_zurich else None

    # 1. Teacher EMA (parameters only; copy at t = 0).
    if uda:
        with phase("ema"):
            ema_update(ctx.teacher_params, ctx.student_params, it, cfg.ema_alpha)

    # 2-3, 5. Teacher passes: pseudo labels, class-balanced crop, regeneration, statistics.
    if uda:
        with phase("teacher"), torch.no_grad():
            prob, plabel, q = run.teacher_labels(ctx, img_t, ref_t)
            crop_hw = (min(cfg.crop_hw[0], img_t.shape[-2]), min(cfg.crop_hw[1], img_t.shape[-1]))
            whole = crop_hw == tuple(img_t.shape[-2:])
            if not whole:
                offsets = ops.sample_crop_offsets(img_t.shape[0], cfg.crop_tries, tuple(img_t.shape[-2:]),
                                                  crop_hw, generator=gen, device=ctx.device)
                window = ops.select_crop_windows(plabel, offsets, crop_hw, num_classes=cfg.num_classes,
                                                 cat_max_ratio=cfg.cat_max_ratio, ignore_index=IGNORE)
                img_t = ops.crop_batch(img_t, window, crop_hw)
                ref_t = ops.crop_batch(ref_t, window, crop_hw) if ref_t is not None else None
                if cfg.regen_pseudo:
                    prob, plabel, q = run.teacher_labels(ctx, img_t, ref_t)
                else:
                    plabel = ops.crop_batch(plabel.unsqueeze(1), window, crop_hw)[:, 0]
            feats_t, proj_t = run.teacher_source(ctx, img_s)
            if debug:
                with _autocast(ctx):
                    vis["source_pseudo"] = resize_logits(teacher.decode(feats_t), tuple(gt_s.shape[-2:])).argmax(1)
        # --- --pseudo-diagnostics only: pseudo labels vs the target crop's labels. Reads, never
        # writes, anything the training uses; no host sync (device-side counters).
        if ctx.pseudo_diag is not None and "gt" in tgt:
            with phase("pseudo_diagnostics"), torch.no_grad():
                gt_t = tgt["gt"] if whole else ops.crop_batch(tgt["gt"], window, crop_hw)
                p_t = prob if prob.shape == plabel.shape else ops.crop_batch(prob.unsqueeze(1), window, crop_hw)[:, 0]
                ctx.pseudo_diag.update(p_t, plabel, gt_t)
        # --- end of --pseudo-diagnostics
        with phase("stats"), torch.no_grad():
            feat, lab = prepare_contrast(proj_t.float(), gt_s, min_ratio=cfg.min_ratio,
                                         num_classes=cfg.num_classes, ignore_index=IGNORE)
            # A non-finite teacher feature must not poison the running statistics for good:
            # such rows are treated as ignored (device-side, no sync).
            lab = torch.where(torch.isfinite(feat).all(dim=1), lab, torch.full_like(lab, IGNORE))
            feat = torch.nan_to_num(feat, nan=0.0, posinf=0.0, neginf=0.0)
            stats.update(feat, lab, process_group=ctx.process_group if ctx.world_size > 1 else None,
                         labels_checked=True)  # prepare_contrast's labels, or IGNORE
        top, bottom = (0, 0) if cfg.dark_zurich else cfg.ignore_rows()
        pweight = pseudo_weight_map(q, tuple(plabel.shape), top, bottom)          # [B,H,W]
        losses["pseudo_q"] = q.detach()

    # 4. Strong augmentation of the student's source image and target crop.
    with phase("augment"):
        img_s_strong = _augment(ctx, img_s, strong, rng, gen, slice(0, 1))
        img_t_strong = _augment(ctx, img_t, strong, rng, gen, slice(1, 2)) if uda else None

    # 6. Student, source: seg CE (+ contrast). Backward.
    with phase("student_source"):
        loss_src, src_ce, src_cl = run.student_source(ctx, img_s_strong, gt_s, class_weight, contrast_on)
        losses["src_ce"] = src_ce.detach()
        if contrast_on:
            losses["src_contrast"] = src_cl.detach()
        _backward(ctx, loss_src)
        del loss_src, src_ce, src_cl

    # 7. Student, target: contrast on the strong crop with ŷ (ignored where the weight is 0).
    if contrast_on:
        with phase("student_target"):
            loss_tgt = run.student_target(ctx, img_t_strong, plabel, pweight)
            losses["tgt_contrast"] = loss_tgt.detach()
            _backward(ctx, loss_tgt, accumulate=True)

    # 8. Self-training on ClassMix of weak source and weak target crop.
    if uda:
        with phase("mix"):
            mix_classes = ops.choose_mix_classes(gt_s, gen)
            mixed_img, mixed_lbl, mixed_w = ops.classmix(img_s, img_t, gt_s, plabel.unsqueeze(1),
                                                         pweight.unsqueeze(1), mix_classes)
            mixed_img = _augment(ctx, mixed_img, strong, rng, gen, slice(2, None), per_image=True)
            loss_mix = run.student_mix(ctx, mixed_img, mixed_lbl, mixed_w, class_weight)
            losses["mix_ce"] = loss_mix.detach()
            _backward(ctx, loss_mix, accumulate=True)
        if debug:
            mask = mix_classes.gather(1, gt_s.flatten(1).long()).view_as(gt_s)
            vis.update(target=img_t, pseudo_label=plabel, pseudo_weight=pweight, mix_mask=mask,
                       mixed_img=mixed_img, mixed_label=mixed_lbl)
    if debug:
        vis.update(source=img_s, source_strong=img_s_strong, source_gt=gt_s)

    # 9. One optimizer step for the accumulated gradients.
    with phase("optimizer"):
        optimizer_step(ctx, losses)
    return {"losses": losses, "debug": vis}
