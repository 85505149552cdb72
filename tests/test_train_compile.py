"""``--compile`` (runner._compile_models): one graph per (network, piece, input shape, grad
mode), compiled in the first iteration and never again; same losses as eager.

A counting backend stands in for inductor (which takes minutes on a 2-core CPU): every
graph dynamo hands to a backend is one compilation.
"""
from __future__ import annotations

import torch

from sepico_fast.contrast import ClassStats
from sepico_fast.models import build_segmentor
from sepico_fast.train.config import make_config
from sepico_fast.train.runner import _compile_models, build_optimizer
from sepico_fast.train.step import StepContext, train_step
from sepico_fast.train.uda import make_teacher


def _ctx(seed=0):
    cfg = make_config(dict(crop=[32, 32], iters=10, warmup_iters=0, contrast_start=0, proj_dim=16,
                           color_jitter_p=0.0, blur=True, pseudo_threshold=0.06))
    torch.manual_seed(seed)
    student = build_segmentor("daformer_tiny", 19, 16, drop_path_rate=0.0)
    for m in student.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                       optimizer=build_optimizer(cfg, student, torch.device("cpu")),
                       stats=ClassStats(19, 16), device=torch.device("cpu"))


def _batches():
    g = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 5, (2, 1, 8, 8), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return {"img": torch.randn(2, 3, 32, 32, generator=g), "gt": gt}, {"img": torch.randn(2, 3, 32, 64, generator=g)}


def test_compiled_step_compiles_each_graph_once_and_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor))[:1])
        return gm.forward

    eager, compiled = _ctx(), _ctx()
    _compile_models(compiled, backend=counting_backend)
    src, tgt = _batches()
    per_iteration = []
    for it in range(4):
        a = train_step(eager, src, tgt, it)["losses"]
        b = train_step(compiled, src, tgt, it)["losses"]
        per_iteration.append(len(graphs))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # Iteration 0 compiles: teacher extract (full image, crop), decode (full, crop), project;
    # student extract, decode, project (grad mode). Later iterations reuse them all.
    assert per_iteration[0] >= 8, graphs
    assert per_iteration == [per_iteration[0]] * 4, per_iteration


def test_student_passes_with_losses_trace_without_graph_breaks():
    """Backbone, heads, seg CE and the contrast loss (with its value checks) of the student's
    source and target passes trace as ONE graph each: no graph break (torch._dynamo.explain)."""
    import torch._dynamo

    from sepico_fast.train.step import contrast_loss, seg_ce

    ctx = _ctx()
    cfg, m, stats = ctx.cfg, ctx.student, ctx.stats
    src, tgt = _batches()

    def student_source(img, gt):
        feats = m.extract(img)
        return seg_ce(m.decode(feats), gt) + contrast_loss(cfg, stats, m.project(feats), gt)

    def student_target(img, label):
        return contrast_loss(cfg, stats, m.project(m.extract(img)), label)

    label = torch.randint(0, 19, (2, 1, 32, 64))
    for fn, args in ((student_source, (src["img"], src["gt"])), (student_target, (tgt["img"], label))):
        torch._dynamo.reset()
        e = torch._dynamo.explain(fn)(*args)
        assert e.graph_break_count == 0 and e.graph_count == 1, [b.reason for b in e.break_reasons]
