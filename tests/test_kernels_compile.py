"""The Triton contrast losses inside ``torch.compile`` (what ``--compile`` does on a GPU):
opaque custom ops (kernels/dist_contrast.py, kernels/bank_contrast.py), so a compiled
region that calls them is ONE graph with no graph break, and its forward and backward
give the numbers of the eager Triton path and of the float64 torch reference.

Runs Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1).
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
    return feat, labels, mean, var, bank, bank_len


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

    feat, labels, mean, var, *_ = _data(40, 16, 5, 4, torch.float32)
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
