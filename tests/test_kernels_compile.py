"""The Triton contrast losses inside ``torch.compile`` (what ``--compile`` does on a GPU):
opaque custom ops (kernels/dist_contrast.py, kernels/bank_contrast.py), so a compiled
region that calls them is ONE graph with no graph break, and its forward and backward
give the numbers of the eager Triton path and of the float64 torch reference.

Runs Triton's interpreter on CPU tensors without a GPU (tests/conftest.py sets
TRITON_INTERPRET=1), the compiled kernels on CUDA tensors with one.
``aot_eager`` compiles forward and backward graphs as inductor would receive them and
runs them without code generation (inductor on a CPU cannot run Triton kernels).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sepico_fast.contrast import load_triton_kernels
from sepico_fast.contrast.losses import bank_contrast_loss_torch, dist_contrast_loss_torch, proto_contrast_loss_torch

IGNORE = 255
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def _data(n, a, c, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = F.normalize(torch.randn(n, a, generator=g), dim=1).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[::5] = IGNORE
    mean = F.normalize(torch.randn(c, a, generator=g), dim=1)
    var = torch.rand(c, a, generator=g) * 0.02
    bank = F.normalize(torch.randn(c, m, a, generator=g), dim=2)
    bank_len = torch.randint(0, m + 1, (c,), generator=g)
    return tuple(t.to(DEV) for t in (feat, labels, mean, var, bank, bank_len))


def _cases(k, labels, mean, var, bank, bank_len):
    """name → (Triton call, float64 torch reference), both f(feat)."""
    tau, reg = 0.5, 0.7  # a small temperature: gradients far from zero
    d = dict(temperature=tau, reg_weight=reg, ignore_index=IGNORE)
    return {
        "dist_stored": (lambda x: k.dist_contrast_loss(x, labels, mean, var, ratio=0.8, grad_mode="stored", **d),
                        lambda x: dist_contrast_loss_torch(x, labels, mean.double(), var.double(), ratio=0.8, **d)),
        "dist_recompute": (lambda x: k.dist_contrast_loss(x, labels, mean, var, ratio=0.8, grad_mode="recompute", **d),
                           lambda x: dist_contrast_loss_torch(x, labels, mean.double(), var.double(), ratio=0.8, **d)),
        "proto": (lambda x: k.proto_contrast_loss(x, labels, mean, **d),
                  lambda x: proto_contrast_loss_torch(x, labels, mean.double(), **d)),
        "bank": (lambda x: k.bank_contrast_loss(x, labels, bank, bank_len, mean=mean, **d),
                 lambda x: bank_contrast_loss_torch(x, labels, bank.double(), bank_len, mean=mean.double(), **d)),
        "bank_unsorted_noreg": (
            lambda x: k.bank_contrast_loss(x, labels, bank, bank_len, temperature=tau, ignore_index=IGNORE, sort=False),
            lambda x: bank_contrast_loss_torch(x, labels, bank.double(), bank_len, temperature=tau,
                                               ignore_index=IGNORE)),
    }


CASE_NAMES = ("dist_stored", "dist_recompute", "proto", "bank", "bank_unsorted_noreg")


@pytest.fixture(scope="module")
def k():
    assert load_triton_kernels()
    import sepico_fast.kernels as kernels
    return kernels


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("n,a,c,m,dtype", [(37, 12, 5, 6, torch.float32), (64, 16, 7, 4, torch.bfloat16),
                                           (0, 16, 5, 4, torch.float32)], ids=["odd", "bf16", "empty"])
def test_compiled_triton_loss_is_one_graph_and_matches(k, name, n, a, c, m, dtype):
    import torch._dynamo

    feat, labels, mean, var, bank, bank_len = _data(n, a, c, m, dtype)
    fn, ref = _cases(k, labels, mean, var, bank, bank_len)[name]
    torch._dynamo.reset()
    try:
        e = torch._dynamo.explain(fn)(feat.clone().requires_grad_())
        assert e.graph_break_count == 0 and e.graph_count == 1, [b.reason for b in e.break_reasons]
        torch._dynamo.reset()
        x = feat.clone().requires_grad_()
        loss = torch.compile(fn, backend="aot_eager", dynamic=False)(x)
        loss.backward()
    finally:
        torch._dynamo.reset()
    x_eager = feat.clone().requires_grad_()
    loss_eager = fn(x_eager)
    loss_eager.backward()
    x64 = feat.double().requires_grad_()
    loss64 = ref(x64)
    loss64.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    # the same kernels: compiled == eager Triton (bitwise for the loss)
    torch.testing.assert_close(loss, loss_eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), loss64.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)


def test_compiled_triton_loss_without_gradient(k):
    """Under no_grad the forward kernel writes no gradient (the [0, A] placeholder)."""
    import torch._dynamo

    feat, labels, mean, var, *_ = _data(40, 16, 5, 4, torch.float32)  # on DEV
    fn = torch.compile(lambda x: k.dist_contrast_loss(x, labels, mean, var, temperature=0.5, ignore_index=IGNORE),
                       backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            loss = fn(feat)
    finally:
        torch._dynamo.reset()
    ref = dist_contrast_loss_torch(feat.double(), labels, mean.double(), var.double(), temperature=0.5,
                                   ignore_index=IGNORE)
    torch.testing.assert_close(loss.double(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("variant", ["dist", "bank"])
def test_student_passes_choose_triton_inside_one_graph(k, monkeypatch, variant):
    """What ``--compile`` traces on a GPU: the dispatch rule itself (``triton_choice``, with a
    CUDA device of sm_90 and the kernels imported before tracing) runs inside the traced
    pass and picks the Triton losses, and the student's source and target passes stay ONE
    graph each (an import or a cache wrapper in the rule would break the graph)."""
    import dataclasses

    import torch._dynamo

    from sepico_fast import dispatch
    from sepico_fast.contrast import ClassStats, validation
    from sepico_fast.models import build_segmentor
    from sepico_fast.train.config import make_config
    from sepico_fast.train.runner import build_optimizer
    from sepico_fast.train.step import ModelPasses, StepContext

    chosen = []

    def choose_as_on_cuda(op, device, dtype=None):
        impl, why = validation.triton_choice(op, torch.device("cuda", 0), dtype)
        chosen.append(impl)
        return impl, why

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for op in validation.TRITON_OPS:
        monkeypatch.setitem(dispatch._BACKENDS, op, dataclasses.replace(dispatch._BACKENDS[op],
                                                                        choose=choose_as_on_cuda))
    cfg = make_config(dict(arch="daformer_tiny", crop=[32, 32], iters=10, warmup_iters=0, contrast_start=0,
                           proj_dim=16, variant=variant, memory_length=8 if variant == "bank" else 0))
    torch.manual_seed(0)
    dev = torch.device(DEV)
    student = build_segmentor("daformer_tiny", 19, 16, drop_path_rate=0.0).to(dev)
    stats = ClassStats(19, 16, memory_length=cfg.memory_length, device=dev)
    g = torch.Generator().manual_seed(3)
    stats.mean = F.normalize(torch.randn(19, 16, generator=g), dim=1).to(dev)
    stats.var = (torch.rand(19, 16, generator=g) * 0.01).to(dev)
    if variant == "bank":
        stats.bank = F.normalize(torch.randn(19, 8, 16, generator=g), dim=2).to(dev)
        stats.bank_len = torch.full((19,), 8, dtype=torch.int64, device=dev)
    ctx = StepContext(cfg=cfg, student=student, teacher=None, optimizer=build_optimizer(cfg, student, dev),
                      stats=stats, device=dev)
    img = torch.randn(2, 3, 32, 32, generator=g).to(dev)
    gt = torch.randint(0, 19, (2, 1, 32, 32), generator=g).to(dev)
    passes = ModelPasses()
    calls = {"student_source": (img, gt, None, True),
             "student_target": (img, gt[:, 0], torch.rand(2, 32, 32, generator=g).round().to(dev))}
    try:
        for name, args in calls.items():
            torch._dynamo.reset()
            chosen.clear()
            e = torch._dynamo.explain(lambda *a, fn=getattr(passes, name): fn(ctx, *a))(*args)
            assert e.graph_break_count == 0 and e.graph_count == 1, (name, [b.reason for b in e.break_reasons])
            assert chosen and set(chosen) == {"triton"}, (name, chosen)
    finally:
        torch._dynamo.reset()
