"""bench/upstream_step.py (the authors' dataflow, the benchmark baseline) on a tiny model.

It must run, give finite losses and update the student, the EMA teacher and the class
statistics; and where both dataflows compute the same quantity from the same inputs (the
source losses of iteration 0 with the whole target image as crop and no jitter / blur),
it must agree with ``train_step`` — the baseline differs in cost, not in mathematics.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # bench/ is a folder of the checkout, not an installed package
    sys.path.insert(0, ROOT)

from bench.upstream_step import build_upstream_step, upstream_train_step  # noqa: E402
from sepico_fast.contrast import ClassStats
from sepico_fast.models import build_segmentor
from sepico_fast.train.config import make_config
from sepico_fast.train.runner import build_optimizer
from sepico_fast.train.step import StepContext, train_step
from sepico_fast.train.uda import make_teacher

A = 16


def tiny_student(seed=0):
    torch.manual_seed(seed)
    model = build_segmentor("daformer_tiny", 19, A, drop_path_rate=0.0)
    for m in model.modules():  # no dropout draws: both dataflows see the same network
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


def batches(source_w=32, target_w=48):
    g = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 5, (2, 1, 8, source_w // 4), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    gt[0, :, :8, :8] = 255
    return ({"img": torch.randn(2, 3, 32, source_w, generator=g), "gt": gt},
            {"img": torch.randn(2, 3, 32, target_w, generator=g)})


def config(**kw):
    base = dict(crop=[32, 32], iters=10, warmup_iters=0, lr=1e-3, contrast_start=0, proj_dim=A,
                pseudo_threshold=0.06, color_jitter_p=0.0, blur=True)
    base.update(kw)
    return make_config(base)


def test_upstream_step_runs_and_updates_everything():
    cfg = config()
    u = build_upstream_step(cfg, "cpu", tiny_student())
    src, tgt = batches()
    before = [p.detach().clone() for p in u.student.parameters()]
    logs = [upstream_train_step(u, src, tgt, it) for it in range(2)]
    for log in logs:
        assert {"src.decode.loss_seg", "src.aux.loss_cl", "tgt.aux.loss_cl", "mix.decode.loss_seg"} <= set(log)
        assert all(math.isfinite(v) for v in log.values()), log
    changed = [not torch.equal(a, p) for a, p in zip(before, u.student.parameters())]
    assert sum(changed) > 0.9 * len(changed)
    # Teacher: EMA of the student after iteration 1 (not a copy of it any more).
    assert any(not torch.equal(t, s) for t, s in zip(u.teacher.parameters(), u.student.parameters()))
    assert float(u.stats.count.sum()) > 0 and torch.isfinite(u.stats.var).all()
    assert u.student.backbone.upstream_layout and u.teacher.decode_head.fuse_layer.bottleneck.upstream_layout


def test_upstream_source_losses_equal_fast_step():
    """Iteration 0, target = crop (no window search), no jitter / blur: same source CE and DistCL."""
    cfg = config(crop=[32, 48], color_jitter_p=1.0, blur=False)
    student = tiny_student()
    u = build_upstream_step(cfg, "cpu", copy.deepcopy(student))
    ctx = StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                      optimizer=build_optimizer(cfg, student, torch.device("cpu")),
                      stats=ClassStats(19, A), device=torch.device("cpu"))
    src, tgt = batches(source_w=48, target_w=48)
    fast = {k: float(v) for k, v in train_step(ctx, src, tgt, 0)["losses"].items()}
    slow = upstream_train_step(u, src, tgt, 0)
    assert math.isclose(fast["src_ce"], slow["src.decode.loss_seg"], rel_tol=1e-4)
    assert math.isclose(fast["src_contrast"], slow["src.aux.loss_cl"], rel_tol=1e-4, abs_tol=1e-6)
    torch.testing.assert_close(u.stats.mean, ctx.stats.mean, rtol=1e-4, atol=1e-6)


def test_upstream_step_rejects_unimplemented_variants():
    with pytest.raises(ValueError, match="variant 'dist'"):
        build_upstream_step(config(variant="bank"), "cpu", tiny_student())


def test_tf32_foreach_baseline_is_the_same_dataflow_with_two_switches():
    """``upstream_tf32_foreach``: foreach AdamW, TF32 only while its iteration runs, same losses
    as the plain baseline on the CPU (where TF32 does not apply)."""
    cfg = config()
    plain = build_upstream_step(cfg, "cpu", tiny_student())
    fast = build_upstream_step(cfg, "cpu", tiny_student(), tf32_foreach=True)
    assert fast.optimizer.defaults["foreach"] is True and plain.optimizer.defaults["foreach"] is False
    assert fast.tf32 and not plain.tf32
    seen = []
    real_extract = type(fast.student).extract

    def spy(self, img):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real_extract(self, img)

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    src, tgt = batches()
    a = upstream_train_step(plain, src, tgt, 0)
    try:
        type(fast.student).extract = spy
        b = upstream_train_step(fast, src, tgt, 0)
    finally:
        type(fast.student).extract = real_extract
    assert seen and all(flags == (True, True) for flags in seen)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a)
