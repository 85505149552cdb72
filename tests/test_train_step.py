"""One full SePiCo iteration (after contrast_start) against a slow step-by-step reference.

The reference below recomputes every part of method §6 with plain torch / Python: EMA by
the formula, pseudo labels by softmax + max, the class-balanced crop by looping over the
windows with ``torch.unique``, colour jitter through ``colorsys`` pixel by pixel, blur
with a dense 2-D Gaussian kernel, label downscaling with a one-hot average pool, the
method §4 statistics merge in float64, the three contrast losses written from the method §5
formulas, cross-entropy from log_softmax, ClassMix with Python sets, and the AdamW update
by hand. Only the random draws (same generators, same order) and the network forward
passes are shared with the implementation.
"""
from __future__ import annotations

import colorsys
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sepico_fast import ops
from sepico_fast.augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size
from sepico_fast.contrast import ClassStats
from sepico_fast.models import build_segmentor
from sepico_fast.train.config import make_config
from sepico_fast.train.runner import build_optimizer
from sepico_fast.train.step import StepContext, iteration_rng, train_step
from sepico_fast.train.uda import make_teacher

C = 19
A = 16
IGN = 255


def tiny_model(seed=0, arch="daformer_tiny"):
    torch.manual_seed(seed)
    m = build_segmentor(arch, C, A, drop_path_rate=0.0)
    for mod in m.modules():  # deterministic student: the reference shares no dropout draws
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
            mod.p = 0.0
    return m


def make_batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    to_img = lambda x: (255.0 * x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # noqa: E731
    img_s = to_img(torch.rand(2, 3, 32, 32, generator=g))  # normalised images of 0..1 pictures
    gt = torch.randint(0, 5, (2, 1, 32, 32), generator=g)
    gt[:, :, :, :4] = 7                      # a class filling whole 4x4 cells
    gt[0, :, 8:16, 8:16] = IGN               # ignored block
    img_t = to_img(torch.rand(2, 3, 32, 48, generator=g))
    return {"img": img_s, "gt": gt}, {"img": img_t}


def make_ctx(variant, seed, arch="daformer_tiny"):
    cfg = make_config(dict(variant=variant, seed=seed, crop=[32, 32], iters=10, warmup_iters=5, lr=1e-3,
                           contrast_start=0, color_jitter_p=0.0, blur=True, crop_tries=10,
                           pseudo_ignore_top=40, pseudo_ignore_bottom=80, proj_dim=A, memory_length=5,
                           pseudo_threshold=0.06))
    student = tiny_model(arch=arch)
    teacher = make_teacher(student)
    opt = build_optimizer(cfg, student, torch.device("cpu"))
    stats = ClassStats(C, A, cfg.memory_length if variant == "bank" else 0)
    ctx = StepContext(cfg=cfg, student=student, teacher=teacher, optimizer=opt, stats=stats,
                      device=torch.device("cpu"))
    return cfg, ctx


# ---------------------------------------------------------------------------------------
# Reference pieces (plain, slow)
# ---------------------------------------------------------------------------------------
def ref_downscale(label, s, min_ratio=0.75):
    lbl = label[:, 0].clone()
    lbl[lbl == IGN] = C
    onehot = F.one_hot(lbl, C + 1).permute(0, 3, 1, 2).double()
    pooled = F.avg_pool2d(onehot, s, s)
    frac, arg = pooled.max(dim=1)
    out = arg.clone()
    out[(arg == C) | (frac < min_ratio)] = IGN
    return out.reshape(-1)


def ref_prepare(proj, label):
    s = label.shape[-1] // proj.shape[-1]
    return proj.permute(0, 2, 3, 1).reshape(-1, proj.shape[1]), ref_downscale(label, s)


def ref_stats_update(st, feat, labels):
    """method §4 merge, float64, class by class."""
    mean, var, count = st["mean"], st["var"], st["count"]
    for c in range(C):
        z = feat[labels == c].double()
        k = z.shape[0]
        if k == 0 and count[c] == 0:
            continue
        w = k / (k + count[c])
        m = z.mean(0) if k else torch.zeros_like(mean[c])
        v = z.var(0, unbiased=False) if k else torch.zeros_like(var[c])
        var[c] = (1 - w) * var[c] + w * v + w * (1 - w) * (mean[c] - m) ** 2
        mean[c] = (1 - w) * mean[c] + w * m
        count[c] = count[c] + k
        if k > 0 and st.get("bank") is not None:
            st["bank"][c] = (st["bank"][c] + [m])[-st["M"]:]


def ref_reg(z, mu, tau):
    zbar = z.mean(0)
    return torch.log_softmax(mu @ zbar / tau, 0).sum() / (C * math.log(C))


def ref_contrast(variant, feat, labels, st, tau=100.0, reg_weight=1.0):
    z_all = feat.double()
    keep = labels != IGN
    z, y = z_all[keep], labels[keep]
    mu, var = st["mean"], st["var"]
    if z.shape[0] == 0:
        return feat.sum() * 0.0
    if variant == "proto":
        loss = -torch.log_softmax(z @ mu.t() / tau, 1).gather(1, y[:, None]).mean()
    elif variant == "dist":
        s = (z @ mu.t() + 0.5 * (z ** 2) @ var.t() / tau) / tau
        extra = 0.5 * ((z ** 2) * var[y]).sum(1) / tau ** 2
        loss = (-torch.log_softmax(s, 1).gather(1, y[:, None])[:, 0] + extra).mean()
    else:
        per = []
        for i in range(z.shape[0]):
            own = st["bank"][int(y[i])]
            negs = [torch.stack([(z[i] @ b) / tau for b in st["bank"][k]]).mean()
                    for k in range(C) if k != int(y[i])]
            neg_sum = torch.stack([n.exp() for n in negs]).sum()
            terms = [-(torch.exp(z[i] @ b / tau) / (torch.exp(z[i] @ b / tau) + neg_sum)).log() for b in own]
            per.append(torch.stack(terms).mean())
        loss = torch.stack(per).mean()
    return loss + reg_weight * ref_reg(z, mu, tau)


def ref_ce(logits, label, weight=None):
    up = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    lbl = label[:, 0]
    logp = torch.log_softmax(up.double(), 1)
    safe = torch.where(lbl == IGN, torch.zeros_like(lbl), lbl)
    nll = -logp.gather(1, safe[:, None])[:, 0]
    nll = torch.where(lbl == IGN, torch.zeros_like(nll), nll)
    if weight is not None:
        nll = nll * weight[:, 0]
    return nll.mean()  # all pixels, ignored included (mmseg 0.16 quirk)


def ref_jitter(img01, u, s, order):
    """colorsys, pixel by pixel, the ops in ``order``: 0 brightness (add), 1 contrast (mul),
    2 saturation and 3 hue in HSV, each clamped to [0, 1]."""
    out = torch.empty_like(img01)
    for b in range(img01.shape[0]):
        db = (2 * u[b, 0].item() - 1) * s
        cf = 1 - s + 2 * s * u[b, 1].item()
        sf = 1 - s + 2 * s * u[b, 2].item()
        hf = (2 * u[b, 3].item() - 1) * s
        px = img01[b].permute(1, 2, 0).reshape(-1, 3).tolist()
        res = []
        for rgb in px:
            for op in order:
                if op == 0:
                    rgb = [min(max(v + db, 0.0), 1.0) for v in rgb]
                elif op == 1:
                    rgb = [min(max(v * cf, 0.0), 1.0) for v in rgb]
                else:
                    h, sat, v = colorsys.rgb_to_hsv(*rgb)
                    h, sat = ((h + hf) % 1.0, sat) if op == 3 else (h, min(max(sat * sf, 0.0), 1.0))
                    rgb = [min(max(c, 0.0), 1.0) for c in colorsys.hsv_to_rgb(h, sat, v)]
            res.append(rgb)
        out[b] = torch.tensor(res, dtype=img01.dtype).reshape(img01.shape[2], img01.shape[3], 3).permute(2, 0, 1)
    return out


def ref_blur(img, sigmas):
    b, c, h, w = img.shape
    ky, kx = blur_kernel_size(h), blur_kernel_size(w)
    out = torch.empty_like(img)
    for i in range(b):
        sg = sigmas[i] if len(sigmas) > 1 else sigmas[0]
        gy = torch.tensor([math.exp(-((j - (ky - 1) / 2) ** 2) / (2 * sg * sg)) for j in range(ky)])
        gx = torch.tensor([math.exp(-((j - (kx - 1) / 2) ** 2) / (2 * sg * sg)) for j in range(kx)])
        k2 = torch.outer(gy / gy.sum(), gx / gx.sum())
        x = F.pad(img[i:i + 1], (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
        out[i] = F.conv2d(x, k2.expand(c, 1, ky, kx).contiguous(), groups=c)[0]
    return out


def ref_strong(img, jitter, blur, rng, gen, per_image=False):
    """Draws as method §6.4 / augment.strong_augment: op order(s) from the host rng, then
    jitter factors and blur σ ~ U(0.15, 1.15) from the device generator."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    n = img.shape[0] if per_image else 1
    out = img
    if jitter:
        orders = [tuple(rng.sample(range(4), 4)) for _ in range(n)]
        u = torch.rand(img.shape[0], 4, generator=gen)
        x01 = (out * std + mean) / 255.0
        out01 = torch.cat([ref_jitter(x01[i:i + 1], u[i:i + 1], 0.2, orders[i if per_image else 0])
                           for i in range(img.shape[0])])
        out = (out01 * 255.0 - mean) / std
    if blur:
        sig = (0.15 + torch.rand(n, generator=gen)).tolist()
        out = ref_blur(out, sig)
    return out


def ref_crop_choice(plabel, offsets, crop_hw):
    best = []
    for b in range(plabel.shape[0]):
        scores = []
        for y0, x0 in offsets[b].tolist():
            win = plabel[b, y0:y0 + crop_hw[0], x0:x0 + crop_hw[1]]
            vals, cnt = torch.unique(win, return_counts=True)
            cnt = cnt[vals != IGN].double()
            if len(cnt) >= 2 and cnt.max() / cnt.sum() < 0.75:
                scores.append(sum(math.log(v) for v in cnt.tolist() if v > 1))
            else:
                scores.append(0.0)
        k = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first maximum
        best.append(offsets[b, k].tolist())
    return best


def ref_lr_factor(it, cfg):
    poly = (1 - it / cfg.iters) ** cfg.poly_power
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return poly * (1 - k)
    return poly


def reference_iteration(cfg, ctx, src, tgt, it, variant):
    """Returns (losses dict, student params after the step, teacher params, stats dict)."""
    student, teacher, opt = ctx.student, ctx.teacher, ctx.optimizer
    rng, gen = iteration_rng(cfg.seed, it, 0, torch.device("cpu"))
    jitter = rng.random() > cfg.color_jitter_p
    blur = rng.random() > 0.5
    # 1. EMA
    a = min(1 - 1 / (it + 1), cfg.ema_alpha)
    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.copy_(a * pt + (1 - a) * ps)
    img_s, gt = src["img"], src["gt"]
    img_t = tgt["img"]
    crop_hw = (32, 32)

    def pseudo(img):
        logits = F.interpolate(teacher.predict(img), size=img.shape[-2:], mode="bilinear", align_corners=False)
        p, lbl = torch.softmax(logits, 1).max(1)
        return p, lbl, (p >= cfg.pseudo_threshold).double().mean()

    with torch.no_grad():
        _, plabel, q = pseudo(img_t)
        offsets = ops.sample_crop_offsets(2, cfg.crop_tries, tuple(img_t.shape[-2:]), crop_hw, generator=gen)
        windows = ref_crop_choice(plabel, offsets, crop_hw)
        img_t = torch.stack([img_t[b, :, y:y + 32, x:x + 32] for b, (y, x) in enumerate(windows)])
        _, plabel, q = pseudo(img_t)
        proj_t = teacher.project(teacher.extract(img_s))
    st = {"mean": ctx.stats.mean.double().clone(), "var": ctx.stats.var.double().clone(),
          "count": ctx.stats.count.double().clone(), "M": cfg.memory_length}
    if variant == "bank":
        st["bank"] = [[ctx.stats.bank[c, j].double() for j in range(int(ctx.stats.bank_len[c]))] for c in range(C)]
    ref_stats_update(st, *ref_prepare(proj_t, gt))

    img_s_strong = ref_strong(img_s, jitter, blur, rng, gen)
    img_t_strong = ref_strong(img_t, jitter, blur, rng, gen)
    top, bottom = 2, 4  # 40 and 80 rows at 640-row scale, for a 32-row crop
    weight = torch.full(plabel.shape, float(q))
    weight[:, :top] = 0
    weight[:, plabel.shape[1] - bottom:] = 0

    feats = student.extract(img_s_strong)
    src_ce = ref_ce(student.decode(feats), gt)
    src_cl = ref_contrast(variant, *ref_prepare(student.project(feats), gt), st)
    tgt_lbl = plabel.clone()
    tgt_lbl[weight == 0] = IGN
    tgt_cl = ref_contrast(variant, *ref_prepare(student.project(student.extract(img_t_strong)), tgt_lbl[:, None]), st)

    present = sorted(set(torch.unique(gt).tolist()))
    keys = torch.rand(2, 256, generator=gen)
    n_pick = (len(present) + 1) // 2
    mask = torch.zeros_like(gt, dtype=torch.bool)
    for b in range(2):
        chosen = sorted(present, key=lambda v: keys[b, v].item())[:n_pick]
        for v in chosen:
            mask[b] |= gt[b] == v
    m = mask.float()
    mixed = m * img_s + (1 - m) * img_t
    mixed = ref_strong(mixed, jitter, blur, rng, gen, per_image=True)
    mixed_lbl = torch.where(mask, gt, plabel[:, None])
    mixed_w = torch.where(mask, torch.ones_like(m), weight[:, None])
    mix_ce = ref_ce(student.predict(mixed), mixed_lbl, mixed_w)

    total = src_ce + src_cl + tgt_cl + mix_ce
    params = list(student.parameters())
    grads = torch.autograd.grad(total, params, allow_unused=True)
    factor = ref_lr_factor(it, cfg)
    new_params, first_moments = [], []
    b1, b2 = cfg.betas
    for p, g in zip(params, grads):
        group = next(gr for gr in opt.param_groups if any(q_ is p for q_ in gr["params"]))
        if g is None:
            new_params.append(p.detach().clone())
            first_moments.append(None)
            continue
        state = opt.state[p]
        step = float(state["step"]) + 1
        m1 = b1 * state["exp_avg"].double() + (1 - b1) * g.double()
        v1 = b2 * state["exp_avg_sq"].double() + (1 - b2) * g.double() ** 2
        lr = group["initial_lr"] * factor
        new = p.detach().double() * (1 - lr * group["weight_decay"])
        denom = (v1 / (1 - b2 ** step)).sqrt() + group["eps"]
        new = new - lr * (m1 / (1 - b1 ** step)) / denom
        new_params.append(new)
        first_moments.append(m1)
    losses = {"src_ce": src_ce, "src_contrast": src_cl, "tgt_contrast": tgt_cl, "mix_ce": mix_ce, "pseudo_q": q}
    return losses, new_params, first_moments, [p.detach().clone() for p in teacher.parameters()], st


@pytest.mark.parametrize("arch", ["daformer_tiny", "dinov2_tiny"])  # the ViT: vit decay rule, padded input
@pytest.mark.parametrize("variant", ["dist", "bank", "proto"])
def test_full_iteration_matches_reference(variant, arch):
    seed = next(s for s in range(100) if all(
        (lambda r: (r.random() > 0.0, r.random() > 0.5))(iteration_rng(s, 1, 0, torch.device("cpu"))[0])))
    cfg, ctx = make_ctx(variant, seed, arch)
    src, tgt = make_batches()
    train_step(ctx, src, tgt, 0)  # iteration 0: EMA copy, non-trivial AdamW state for iteration 1
    ref_ctx = copy.deepcopy(ctx)  # one memo: the copied optimizer points at the copied student

    out = train_step(ctx, src, tgt, 1)
    ref_losses, ref_params, ref_m1, ref_teacher, ref_st = reference_iteration(cfg, ref_ctx, src, tgt, 1, variant)

    assert set(out["losses"]) == set(ref_losses)
    for k, v in ref_losses.items():
        torch.testing.assert_close(out["losses"][k].double(), v.detach().double(), rtol=2e-5, atol=2e-6,
                                   msg=f"loss {k}")
    assert float(ref_losses["src_contrast"].detach()) != 0.0 and float(ref_losses["tgt_contrast"].detach()) != 0.0
    for p, ref in zip(ctx.teacher.parameters(), ref_teacher):
        torch.testing.assert_close(p, ref, rtol=0, atol=1e-6)
    before = [p.detach().double() for p in ref_ctx.student.parameters()]
    moved = 0
    lr = cfg.lr * ref_lr_factor(1, cfg)
    for p, ref, old, m1 in zip(ctx.student.parameters(), ref_params, before, ref_m1):
        # Gradients, linearly: Adam's first moment (1-β1)·g + β1·m_prev.
        assert m1 is not None
        torch.testing.assert_close(ctx.optimizer.state[p]["exp_avg"].double(), m1, rtol=1e-4,
                                   atol=1e-5 * float(m1.abs().max()) + 1e-12)
        # The update itself. Adam divides by sqrt(v), so an element's update is only as certain as
        # its gradient relative to its own size: the check above knows the gradient to 1e-5 of the
        # largest, which pins the update to 1% of lr where |m1| > 1e-3 of the largest; smaller
        # (float32-rounding-sized) gradients are held to the size of an update, lr.
        upd, ref_upd = p.detach().double() - old, ref - old
        known = m1.abs() > 1e-3 * float(m1.abs().max())
        torch.testing.assert_close(upd[known], ref_upd[known], rtol=1e-3, atol=1e-2 * lr)
        torch.testing.assert_close(upd[~known], ref_upd[~known], rtol=0, atol=lr)
        moved += int(not torch.equal(p.detach().double(), old))
    assert moved > 0.9 * len(before)  # the update touched (nearly) every parameter
    torch.testing.assert_close(ctx.stats.mean.double(), ref_st["mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctx.stats.var.double(), ref_st["var"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ctx.stats.count.double(), ref_st["count"])
    if variant == "bank":
        for c in range(C):
            n = int(ctx.stats.bank_len[c])
            assert n == len(ref_st["bank"][c])
            for j in range(n):
                torch.testing.assert_close(ctx.stats.bank[c, j].double(), ref_st["bank"][c][j], rtol=1e-5, atol=1e-6)


def test_nan_loss_skips_the_step_without_touching_state():
    cfg, ctx = make_ctx("dist", 0)
    src, tgt = make_batches()
    train_step(ctx, src, tgt, 0)
    params = [p.detach().clone() for p in ctx.student.parameters()]
    steps = [ctx.optimizer.state[p]["step"].clone() for p in ctx.student.parameters() if p in ctx.optimizer.state]
    count = ctx.stats.count.clone()
    bad = {"img": src["img"].clone(), "gt": src["gt"]}
    bad["img"][0, :, 3, 3] = float("nan")
    out = train_step(ctx, bad, tgt, 1)
    assert not torch.isfinite(out["losses"]["src_ce"])
    assert float(ctx.skipped) == 1.0
    assert all(torch.equal(a, p) for a, p in zip(params, ctx.student.parameters()))
    assert all(torch.equal(s, ctx.optimizer.state[p]["step"]) for s, p in
               zip(steps, [p for p in ctx.student.parameters() if p in ctx.optimizer.state]))
    assert torch.isfinite(ctx.stats.mean).all() and torch.isfinite(ctx.stats.var).all()
    assert torch.all(ctx.stats.count >= count)
    train_step(ctx, src, tgt, 2)  # training goes on normally afterwards
    assert float(ctx.skipped) == 1.0
    assert not all(torch.equal(a, p) for a, p in zip(params, ctx.student.parameters()))
