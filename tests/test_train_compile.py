"""``--compile`` (runner.compile_step): each model pass of the iteration with its loss
(step.ModelPasses) is one graph per (pass, input shape, grad mode), with no graph break,
compiled in the first iterations (the source pass again at contrast start) and never
again; the losses equal eager mode's.

A counting backend stands in for inductor (which takes minutes on a 2-core CPU): every
graph dynamo hands to a backend is one compilation; dynamo's tracing, guards and graph
breaks are the same whichever backend follows.
"""
from __future__ import annotations

import functools

import pytest
import torch

from sepico_fast.contrast import ClassStats
from sepico_fast.models import build_segmentor
from sepico_fast.train.config import make_config
from sepico_fast.train.runner import build_optimizer, compile_step
from sepico_fast.train.step import ModelPasses, StepContext, train_step
from sepico_fast.train.uda import make_teacher


def _ctx(arch="daformer_tiny", variant="dist", contrast_start=0, seed=0):
    cfg = make_config(dict(arch=arch, crop=[28, 28] if arch.startswith("dinov2") else [32, 32], iters=10,
                           warmup_iters=0, contrast_start=contrast_start, proj_dim=16, variant=variant,
                           memory_length=8 if variant == "bank" else 0,
                           color_jitter_p=0.0, blur=True, pseudo_threshold=0.06))
    torch.manual_seed(seed)
    student = build_segmentor(arch, 19, 16, drop_path_rate=0.0)
    for m in student.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                       optimizer=build_optimizer(cfg, student, torch.device("cpu")),
                       stats=ClassStats(19, 16, memory_length=cfg.memory_length), device=torch.device("cpu"))


def _batches(ctx):
    h, w = ctx.cfg.crop_hw
    g = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 5, (2, 1, h // 4, w // 4), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return {"img": torch.randn(2, 3, h, w, generator=g), "gt": gt}, {"img": torch.randn(2, 3, h, 2 * w, generator=g)}


def _counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_compiled_step_compiles_each_graph_once_and_matches_eager():
    """Contrast starts at iteration 2: iteration 0 compiles every pass (the teacher's labels
    twice: full image and crop), iteration 2 the source pass with contrast and the target
    pass; later iterations compile nothing. Losses equal eager mode's at every iteration."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []
    eager, compiled = _ctx(contrast_start=2), _ctx(contrast_start=2)
    compile_step(compiled, backend=_counting_backend(graphs))
    src, tgt = _batches(eager)
    per_iteration = []
    try:
        for it in range(6):
            a = train_step(eager, src, tgt, it)["losses"]
            b = train_step(compiled, src, tgt, it)["losses"]
            per_iteration.append(len(graphs))
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        # the student's weights took the same steps
        for p, q in zip(eager.student.parameters(), compiled.student.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()
    first = per_iteration[0]
    # teacher labels (full, crop), teacher source, student source (CE only), student mix
    assert first == 5, [g.graph for g in graphs]
    assert per_iteration[1] == first, per_iteration
    # contrast start: student source with contrast, student target; then nothing new
    assert per_iteration[2:] == [first + 2] * 4, per_iteration


@pytest.mark.parametrize("arch,variant", [("daformer_tiny", "dist"), ("daformer_tiny", "bank"),
                                          ("daformer_tiny", "proto"), ("dlv2_tiny", "dist"),
                                          ("dinov2_tiny", "dist")])
def test_every_model_pass_traces_as_one_graph_without_breaks(arch, variant):
    """Each of the five passes (forward with its loss: backbone, heads, seg CE, the contrast
    loss with its value checks, the pseudo-label op) is ONE graph with no graph break
    (torch._dynamo.explain), in the grad mode the step runs it in."""
    import torch._dynamo

    ctx = _ctx(arch, variant)
    src, tgt = _batches(ctx)
    h, w = ctx.cfg.crop_hw
    plabel = torch.randint(0, 19, (2, h, w))
    pweight = torch.rand(2, h, w).round()
    calls = {
        "teacher_labels": (True, (tgt["img"], None)),
        "teacher_source": (True, (src["img"],)),
        "student_source": (False, (src["img"], src["gt"], None, True)),
        "student_target": (False, (src["img"], plabel, pweight)),
        "student_mix": (False, (src["img"], src["gt"], torch.rand(2, 1, h, w), None)),
    }
    assert set(calls) == set(ModelPasses.NAMES)
    passes = ModelPasses()
    try:
        for name, (no_grad, args) in calls.items():
            torch._dynamo.reset()
            fn = functools.partial(getattr(passes, name), ctx)
            with torch.set_grad_enabled(not no_grad):
                e = torch._dynamo.explain(fn)(*args)
            assert e.graph_break_count == 0 and e.graph_count == 1, (name, [b.reason for b in e.break_reasons])
    finally:
        torch._dynamo.reset()
