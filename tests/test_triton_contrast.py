"""Triton DistCL / ProtoCL / BankCL kernels vs independent float64 formulations (method §5).

Runs in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported), so sizes stay tiny; block sizes are forced small so that several
blocks, partial blocks and masked tails are exercised.
"""
import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("sepico_fast.kernels")

IGNORE = 255
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- references
def _reg64(zv, mean, tau):
    c = mean.shape[0]
    if c < 2:
        return zv.new_zeros(())
    zbar = zv.mean(0)
    return torch.log_softmax(mean @ zbar / tau, 0).sum() / (c * math.log(c))


def dist_ref(z, y, mean, var, tau=100.0, lam=1.0, w=0.0):
    """Float64 DistCL written from method §5 as −log softmax + the cancelling positive term."""
    z, mean, var = z.double(), mean.double(), var.double()
    v = y != IGNORE
    if not bool(v.any()):
        return (z * 0).sum()
    zv, yv = z[v], y[v]
    s = (zv @ mean.T + 0.5 * (zv * zv) @ var.T * lam / tau) / tau
    loss = -torch.log_softmax(s, 1).gather(1, yv[:, None])[:, 0]
    loss = loss + 0.5 * ((zv * zv) * var[yv]).sum(1) * lam / tau**2
    return loss.mean() + w * _reg64(zv, mean, tau)


def proto_ref(z, y, mean, tau=100.0, w=0.0):
    z, mean = z.double(), mean.double()
    v = y != IGNORE
    if not bool(v.any()):
        return (z * 0).sum()
    zv, yv = z[v], y[v]
    loss = F.cross_entropy(zv @ mean.T / tau, yv)
    return loss + w * _reg64(zv, mean, tau)


def make_inputs(n, a, c, *, ignore_frac=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, a, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, c, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    mean = F.normalize(torch.randn(c, a, generator=g, dtype=torch.float64), dim=1) * 0.8
    # class spread well above the tiny realistic variances so the σ² term is visible
    var = torch.rand(c, a, generator=g, dtype=torch.float64) * 2.0
    return z, y, mean, var


def grad_of(fn, z):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z)
    loss.backward()
    return loss.detach(), z.grad


def assert_close(actual, expected, rtol, atol_scale, what):
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.double().cpu() - expected.cpu()).abs().max()
    assert bool(err <= rtol * scale + atol_scale), f"{what}: max err {err:.3g}, scale {scale:.3g}"


# ----------------------------------------------------------------------------- DistCL / ProtoCL
CASES = [  # (N, A, C, block_n, reg_weight)
    (37, 16, 5, 16, 0.0),
    (150, 64, 19, 32, 1.0),
    (257, 64, 5, 64, 1.0),
    (100, 512, 19, 32, 0.0),
    (70, 512, 5, 16, 1.0),
]


@pytest.mark.parametrize("variant", ["dist", "proto"])
@pytest.mark.parametrize("n,a,c,block_n,w", CASES)
def test_fp32_matches_float64(variant, n, a, c, block_n, w):
    z, y, mean, var = make_inputs(n, a, c, seed=n + a + c)
    tau, lam = 100.0, 1.0
    mode = "recompute" if n % 2 else "stored"  # both backward strategies across the cases
    if variant == "dist":
        ref = lambda t: dist_ref(t, y, mean, var, tau, lam, w)  # noqa: E731
        tri = lambda t: kernels.dist_contrast_loss(  # noqa: E731
            t, y.to(DEV), mean.float().to(DEV), var.float().to(DEV), tau, lam, w, IGNORE,
            grad_mode=mode, block_n=block_n)
    else:
        ref = lambda t: proto_ref(t, y, mean, tau, w)  # noqa: E731
        tri = lambda t: kernels.proto_contrast_loss(  # noqa: E731
            t, y.to(DEV), mean.float().to(DEV), tau, w, IGNORE, grad_mode=mode, block_n=block_n)
    l64, g64 = grad_of(ref, z)
    l32, g32 = grad_of(tri, z.float().to(DEV))
    assert l32.dtype == torch.float32 and l32.shape == ()
    assert g32.dtype == torch.float32 and g32.shape == z.shape
    assert_close(l32, l64, 1e-5, 0.0, "loss")
    assert_close(g32, g64, 1e-5, 0.0, "grad")


def test_variance_term_matters():
    """Guard against a silently dropped σ² term: DistCL must differ from ProtoCL here."""
    z, y, mean, var = make_inputs(64, 16, 5, seed=3)
    var = var * 2000.0  # make κ Σ z² σ² comparable to z·μ/τ
    zf, yd, mf, vf = z.float().to(DEV), y.to(DEV), mean.float().to(DEV), var.float().to(DEV)
    d = kernels.dist_contrast_loss(zf, yd, mf, vf, 100.0, 1.0, 0.0, IGNORE, block_n=32)
    p = kernels.proto_contrast_loss(zf, yd, mf, 100.0, 0.0, IGNORE, block_n=32)
    assert_close(d, dist_ref(z, y, mean, var), 1e-5, 0.0, "loss")
    assert abs(d.item() - p.item()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["dist", "proto"])
@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_half_inputs_vs_fp32_reference(dtype, variant, mode):
    """Half-precision features: fp32 math inside, gradient rounded to the feature dtype.

    The reference is the float64 loss of the *rounded* features, so only kernel error is
    measured: loss within 1e-4 relative, gradient within 1.5 % of its largest entry (one bf16
    rounding of the stored gradient plus the rounded statistics in the products).
    """
    n, a, c = 120, 64, 19
    z, y, mean, var = make_inputs(n, a, c, seed=11)
    zh = z.to(dtype)
    if variant == "dist":
        ref = lambda t: dist_ref(t, y, mean.float(), var.float(), w=1.0)  # noqa: E731
        tri = lambda t: kernels.dist_contrast_loss(  # noqa: E731
            t, y.to(DEV), mean.float().to(DEV), var.float().to(DEV), 100.0, 1.0, 1.0, IGNORE,
            grad_mode=mode, block_n=32)
    else:
        ref = lambda t: proto_ref(t, y, mean.float(), w=1.0)  # noqa: E731
        tri = lambda t: kernels.proto_contrast_loss(  # noqa: E731
            t, y.to(DEV), mean.float().to(DEV), 100.0, 1.0, IGNORE, grad_mode=mode, block_n=32)
    l64, g64 = grad_of(ref, zh.double())
    lh, gh = grad_of(tri, zh.to(DEV))
    assert lh.dtype == torch.float32 and gh.dtype == dtype
    assert_close(lh, l64, 1e-4, 0.0, "loss")
    assert_close(gh, g64, 1.5e-2, 0.0, "grad")


@pytest.mark.parametrize("variant", ["dist", "proto"])
@pytest.mark.parametrize("n", [0, 40])
@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_no_valid_pixel_gives_zero_loss_and_grad(variant, n, mode):
    a, c = 16, 5
    z = F.normalize(torch.randn(n, a), dim=1).to(DEV).requires_grad_(True)
    y = torch.full((n,), IGNORE, dtype=torch.long, device=DEV)
    mean = torch.randn(c, a, device=DEV)
    if variant == "dist":
        loss = kernels.dist_contrast_loss(z, y, mean, torch.rand(c, a, device=DEV), 100.0, 1.0,
                                          1.0, IGNORE, grad_mode=mode, block_n=16)
    else:
        loss = kernels.proto_contrast_loss(z, y, mean, 100.0, 1.0, IGNORE, grad_mode=mode,
                                           block_n=16)
    loss.backward()
    assert loss.shape == () and loss.item() == 0.0
    assert z.grad.shape == (n, a) and bool(torch.isfinite(z.grad).all())
    assert bool((z.grad == 0).all())


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_grad_output_scaling_and_strided_input(mode):
    """A non-unit incoming gradient is applied (AMP loss scale); a transposed view is read."""
    n, a, c = 50, 16, 5
    z, y, mean, var = make_inputs(n, a, c, seed=5)
    zt = z.float().T.contiguous().to(DEV).requires_grad_(True)  # [A, N]; zt.T is strided
    loss = kernels.dist_contrast_loss(zt.T, y.to(DEV), mean.float().to(DEV),
                                      var.float().to(DEV), 100.0, 1.0, 1.0, IGNORE,
                                      grad_mode=mode, block_n=16)
    (loss * 3.0).backward()
    l64, g64 = grad_of(lambda t: dist_ref(t, y, mean, var, w=1.0) * 3.0, z)
    assert_close(loss * 3.0, l64, 1e-5, 0.0, "loss")
    assert_close(zt.grad.T, g64, 1e-5, 0.0, "grad")


def test_forward_without_grad_and_double_backward_error():
    n, a, c = 20, 16, 5
    z, y, mean, _ = make_inputs(n, a, c, seed=7)
    zf, yd, mf = z.float().to(DEV), y.to(DEV), mean.float().to(DEV)
    with torch.no_grad():
        l0 = kernels.proto_contrast_loss(zf.requires_grad_(True), yd, mf, 100.0, 0.0, IGNORE)
    assert not l0.requires_grad
    assert_close(l0, proto_ref(z, y, mean), 1e-5, 0.0, "loss")
    loss = kernels.proto_contrast_loss(zf, yd, mf, 100.0, 0.0, IGNORE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()
    # recomputing the gradient in backward supports retain_graph
    zf.grad = None
    loss = kernels.proto_contrast_loss(zf, yd, mf, 100.0, 0.0, IGNORE, grad_mode="recompute")
    loss.backward(retain_graph=True)
    first = zf.grad.clone()
    loss.backward()
    assert torch.allclose(zf.grad, 2 * first)
    with pytest.raises(ValueError, match="grad_mode"):
        kernels.proto_contrast_loss(zf, yd, mf, 100.0, 0.0, IGNORE, grad_mode="lazy")


def test_out_of_range_label_poisons_loss():
    z, y, mean, var = make_inputs(20, 16, 5, ignore_frac=0.0, seed=9)
    y[3] = 7  # C = 5
    loss = kernels.dist_contrast_loss(z.float().to(DEV), y.to(DEV), mean.float().to(DEV),
                                      var.float().to(DEV), 100.0, 1.0, 0.0, IGNORE)
    assert math.isnan(loss.item())


# ----------------------------------------------------------------------------- BankCL
def bank_ref(z, y, bank, bank_len, tau=100.0, mean=None, w=0.0):
    """Float64 BankCL written literally from method §5, one class at a time.

    Negatives are the mean over the other class's entries of the individual similarities
    (not a dot with a mean row); pixels whose own bank is empty are left out of the mean.
    """
    z, bank = z.double(), bank.double()
    c = bank.shape[0]
    lens = [int(v) for v in bank_len]
    total, count = z.sum() * 0, 0
    for k in range(c):
        rows = (y == k).nonzero()[:, 0]
        if len(rows) == 0 or lens[k] == 0:
            continue
        zk = z[rows]
        pos = zk @ bank[k, :lens[k]].T / tau  # [n_k, L]
        negs = [(zk @ bank[j, :lens[j]].T / tau).mean(1) for j in range(c) if j != k and lens[j] > 0]
        neg_sum = torch.stack(negs, 1).exp().sum(1, keepdim=True) if negs else torch.zeros_like(pos[:, :1])
        total = total - torch.log(pos.exp() / (pos.exp() + neg_sum)).mean(1).sum()
        count += len(rows)
    loss = total / count if count else total
    valid = y != IGNORE
    if w and bool(valid.any()):
        loss = loss + w * _reg64(z[valid], mean.double(), tau)
    return loss


def make_bank(c, m, a, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(c, m, a, generator=g, dtype=torch.float64), dim=2)
    bank_len = torch.tensor(lens, dtype=torch.long)
    for k in range(c):  # stale rows past bank_len must not be read
        bank[k, lens[k]:] = float("nan")
    return bank, bank_len


BANK_CASES = [  # (N, A, C, M, block_n, sort, reg_weight)
    (45, 16, 5, 7, 16, True, 0.0),
    (130, 64, 19, 20, 32, True, 1.0),
    (90, 64, 5, 33, 32, False, 1.0),
    (60, 512, 5, 16, 16, True, 0.0),
]


@pytest.mark.parametrize("n,a,c,m,block_n,sort,w", BANK_CASES)
def test_bank_fp32_matches_float64(n, a, c, m, block_n, sort, w):
    z, y, mean, _ = make_inputs(n, a, c, seed=n + m)
    g = torch.Generator().manual_seed(m)
    lens = torch.randint(1, m + 1, (c,), generator=g).tolist()
    lens[1] = 0  # one empty bank: its pixels have no positive, it is no negative
    bank, bank_len = make_bank(c, m, a, lens, seed=c)
    l64, g64 = grad_of(lambda t: bank_ref(t, y, bank, bank_len, 100.0, mean, w), z)
    l32, g32 = grad_of(lambda t: kernels.bank_contrast_loss(
        t, y.to(DEV), bank.float().to(DEV), bank_len.to(DEV), 100.0, mean.float().to(DEV), w,
        IGNORE, sort=sort, block_n=block_n), z.float().to(DEV))
    assert l32.dtype == torch.float32 and l32.shape == ()
    assert_close(l32, l64, 1e-5, 0.0, "loss")
    assert_close(g32, g64, 1e-5, 0.0, "grad")


def test_bank_strong_logits_and_single_bank():
    """Large similarities (τ = 0.1) exercise the stable softplus/sigmoid; with one class
    banked there are no negatives and the loss of that class is exactly 0."""
    n, a, c, m = 60, 16, 5, 6
    z, y, mean, _ = make_inputs(n, a, c, seed=21)
    bank, bank_len = make_bank(c, m, a, [3, 6, 1, 2, 5], seed=4)
    l64, g64 = grad_of(lambda t: bank_ref(t, y, bank, bank_len, 0.1), z)
    l32, g32 = grad_of(lambda t: kernels.bank_contrast_loss(
        t, y.to(DEV), bank.float().to(DEV), bank_len.to(DEV), 0.1, None, 0.0, IGNORE,
        block_n=16), z.float().to(DEV))
    assert_close(l32, l64, 1e-5, 0.0, "loss")
    assert_close(g32, g64, 1e-5, 0.0, "grad")
    only = torch.tensor([0, 4, 0, 0, 0])
    loss = kernels.bank_contrast_loss(z.float().to(DEV), y.to(DEV), bank.float().to(DEV),
                                      only.to(DEV), 100.0, None, 0.0, IGNORE)
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bank_half_inputs(dtype):
    n, a, c, m = 100, 64, 5, 12
    z, y, mean, _ = make_inputs(n, a, c, seed=13)
    bank, bank_len = make_bank(c, m, a, [12, 5, 1, 8, 3], seed=5)
    zh = z.to(dtype)
    l64, g64 = grad_of(lambda t: bank_ref(t, y, bank.float(), bank_len, 100.0, mean.float(), 1.0),
                       zh.double())
    lh, gh = grad_of(lambda t: kernels.bank_contrast_loss(
        t, y.to(DEV), bank.float().to(DEV), bank_len.to(DEV), 100.0, mean.float().to(DEV), 1.0,
        IGNORE, block_n=32), zh.to(DEV))
    assert gh.dtype == dtype
    assert_close(lh, l64, 1e-4, 0.0, "loss")
    assert_close(gh, g64, 1.5e-2, 0.0, "grad")


@pytest.mark.parametrize("n", [0, 30])
def test_bank_no_valid_pixel(n):
    a, c, m = 16, 5, 4
    z = F.normalize(torch.randn(n, a), dim=1).to(DEV).requires_grad_(True)
    y = torch.full((n,), IGNORE, dtype=torch.long, device=DEV)
    bank, bank_len = make_bank(c, m, a, [4, 4, 4, 4, 4])
    loss = kernels.bank_contrast_loss(z, y, bank.float().to(DEV), bank_len.to(DEV), 100.0,
                                      torch.randn(c, a, device=DEV), 1.0, IGNORE)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == (n, a) and bool((z.grad == 0).all())


# ----------------------------------------------------------------------------- public API
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_triton_matches_torch(dtype):
    """sepico_fast.contrast: impl="triton" (these kernels) against impl="torch"."""
    contrast = pytest.importorskip("sepico_fast.contrast")
    n, a, c, m = 90, 64, 19, 6
    z, y, mean, var = make_inputs(n, a, c, seed=17)
    var = var * 0.01
    bank, bank_len = make_bank(c, m, a, [(k % m) + 1 for k in range(c)], seed=3)
    bank = torch.nan_to_num(bank)  # the public API rejects non-finite banks
    zd, yd = z.to(dtype).to(DEV), y.to(DEV)
    md, vd, bd = (t.float().to(DEV) for t in (mean, var, bank))
    bl = bank_len.to(DEV)
    calls = {
        "proto": lambda t, impl: contrast.proto_contrast_loss(t, yd, md, reg_weight=1.0, impl=impl),
        "dist": lambda t, impl: contrast.dist_contrast_loss(t, yd, md, vd, reg_weight=1.0, impl=impl),
        "bank": lambda t, impl: contrast.bank_contrast_loss(t, yd, bd, bl, mean=md, reg_weight=1.0,
                                                            impl=impl),
    }
    tol_loss, tol_grad = (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1.5e-2)
    for name, call in calls.items():
        lt, gt = grad_of(lambda t: call(t, "torch"), zd)
        lk, gk = grad_of(lambda t: call(t, "triton"), zd)
        assert lk.dtype == torch.float32 and gk.dtype == dtype, name
        assert_close(lk, lt.float(), tol_loss, 0.0, f"{name} loss")
        assert_close(gk, gt.float(), tol_grad, 0.0, f"{name} grad")


def test_bank_fp16_full_banks():
    """The SePiCo bank size (M = 200, all entries valid) with fp16 features: the 1/(τ L) =
    5e-5 factor is applied in fp32 after the products, not folded into fp16 operands."""
    n, a, c, m = 80, 16, 5, 200
    z, y, mean, _ = make_inputs(n, a, c, seed=29)
    bank, bank_len = make_bank(c, m, a, [m] * c, seed=6)
    zh = z.half()
    l64, g64 = grad_of(lambda t: bank_ref(t, y, bank.float(), bank_len), zh.double())
    lh, gh = grad_of(lambda t: kernels.bank_contrast_loss(
        t, y.to(DEV), bank.float().to(DEV), bank_len.to(DEV), 100.0, None, 0.0, IGNORE),
        zh.to(DEV))
    assert_close(lh, l64, 1e-4, 0.0, "loss")
    assert_close(gh, g64, 1.5e-2, 0.0, "grad")


# ----------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("variant", ["dist", "bank"])
def test_regulariser_is_fp32_inside_autocast(variant):
    """The training step calls the losses inside autocast: the regulariser's two small
    products must not run in bf16 (that rounded r to ~4e-3 and its gradient to ~1e-3)."""
    n, a, c, m = 48, 64, 19, 4
    z, y, mean, var = make_inputs(n, a, c, seed=31)
    zf, yd, mf = z.float().to(DEV), y.to(DEV), mean.float().to(DEV)
    vf = (var * 0.01).float().to(DEV)
    bank, bank_len = make_bank(c, m, a, [m] * c, seed=2)
    bd, bl = bank.float().to(DEV), bank_len.to(DEV)

    def run(enabled):
        with torch.autocast(zf.device.type, dtype=torch.bfloat16, enabled=enabled):
            if variant == "dist":
                return grad_of(lambda t: kernels.dist_contrast_loss(
                    t, yd, mf, vf, 100.0, 1.0, 1.0, IGNORE, block_n=16), zf)
            return grad_of(lambda t: kernels.bank_contrast_loss(
                t, yd, bd, bl, 100.0, mf, 1.0, IGNORE, block_n=16), zf)

    l_plain, g_plain = run(False)
    l_amp, g_amp = run(True)
    assert l_amp.dtype == torch.float32
    assert_close(l_amp, l_plain, 1e-6, 0.0, "loss under autocast")
    assert_close(g_amp, g_plain, 1e-6, 0.0, "grad under autocast")


def test_no_gradient_buffer_without_autograd(monkeypatch):
    """needs_input_grad is True under torch.no_grad(); the forward must still skip writing
    the N×A gradient then (evaluation / logging calls)."""
    from sepico_fast.kernels import bank_contrast, dist_contrast

    seen = []
    run_kernel, launch = dist_contrast._run_kernel, bank_contrast._launch

    def spy_run(*args, write_grad, **kw):
        seen.append(write_grad)
        return run_kernel(*args, write_grad=write_grad, **kw)

    def spy_launch(*args):
        seen.append(args[8])  # write_grad
        return launch(*args)

    monkeypatch.setattr(dist_contrast, "_run_kernel", spy_run)
    monkeypatch.setattr(bank_contrast, "_launch", spy_launch)
    z, y, mean, _ = make_inputs(20, 16, 5, seed=7)
    zf = z.float().to(DEV).requires_grad_(True)
    bank, bank_len = make_bank(5, 4, 16, [4] * 5)
    calls = [lambda: kernels.proto_contrast_loss(zf, y.to(DEV), mean.float().to(DEV)),
             lambda: kernels.bank_contrast_loss(zf, y.to(DEV), bank.float().to(DEV),
                                                bank_len.to(DEV))]
    for call in calls:
        seen.clear()
        with torch.no_grad():
            assert not call().requires_grad
        assert seen == [False]
        seen.clear()
        call().backward()
        assert seen == [True]


def test_double_backward_is_refused_and_tiles_are_checked():
    z, y, mean, _ = make_inputs(20, 16, 5, seed=8)
    zf = z.float().to(DEV).requires_grad_(True)
    w = torch.ones((), device=DEV, requires_grad=True)
    loss = kernels.proto_contrast_loss(zf, y.to(DEV), mean.float().to(DEV)) * w
    (g,) = torch.autograd.grad(loss, zf, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    for bad in (8, 24):  # tl.dot on a GPU needs power-of-two tiles >= 16
        with pytest.raises(ValueError, match="block_n"):
            kernels.proto_contrast_loss(zf, y.to(DEV), mean.float().to(DEV), block_n=bad)
        with pytest.raises(ValueError, match="block_a"):
            kernels.class_moments(zf.detach(), y.to(DEV), 5, IGNORE, block_a=bad)


# ----------------------------------------------------------------------------- non-finite ignored rows
def _poison_ignored(z, y):
    """NaN and ±Inf features on the ignored rows (the reference never reads them)."""
    z = z.clone()
    rows = (y == IGNORE).nonzero()[:, 0]
    assert len(rows) >= 3
    z[rows[0]] = float("nan")
    z[rows[1], ::2] = float("inf")
    z[rows[2]] = -float("inf")
    return z


@pytest.mark.parametrize("variant,mode", [("dist", "stored"), ("dist", "recompute"),
                                          ("proto", "stored"), ("proto", "recompute"),
                                          ("bank", "stored")])
def test_non_finite_ignored_rows_give_finite_loss_and_zero_grad(variant, mode):
    """A NaN/Inf feature on an ignored pixel must not leak into the loss or the gradient
    (the float64 reference drops those rows before any product)."""
    n, a, c, m = 70, 16, 5, 6
    z, y, mean, var = make_inputs(n, a, c, ignore_frac=0.3, seed=33)
    zp = _poison_ignored(z, y)
    if variant == "bank":
        bank, bank_len = make_bank(c, m, a, [6, 2, 4, 1, 5], seed=8)
        ref = lambda t: bank_ref(t, y, bank, bank_len, 100.0, mean, 1.0)  # noqa: E731
        fn = lambda t: kernels.bank_contrast_loss(  # noqa: E731
            t, y.to(DEV), bank.float().to(DEV), bank_len.to(DEV), 100.0, mean.float().to(DEV),
            1.0, IGNORE, block_n=16)
    elif variant == "dist":
        ref = lambda t: dist_ref(t, y, mean, var, w=1.0)  # noqa: E731
        fn = lambda t: kernels.dist_contrast_loss(  # noqa: E731
            t, y.to(DEV), mean.float().to(DEV), var.float().to(DEV), 100.0, 1.0, 1.0, IGNORE,
            grad_mode=mode, block_n=16)
    else:
        ref = lambda t: proto_ref(t, y, mean, w=1.0)  # noqa: E731
        fn = lambda t: kernels.proto_contrast_loss(  # noqa: E731
            t, y.to(DEV), mean.float().to(DEV), 100.0, 1.0, IGNORE, grad_mode=mode, block_n=16)
    # the reference on the same features with the ignored rows zeroed (it never reads them)
    l64, g64 = grad_of(ref, torch.where((y == IGNORE)[:, None], 0.0, zp))
    l32, g32 = grad_of(fn, zp.float().to(DEV))
    assert bool(torch.isfinite(l32)), f"loss {l32}"
    assert bool(torch.isfinite(g32).all()), "non-finite gradient from an ignored row"
    assert bool((g32.cpu()[y == IGNORE] == 0).all())
    assert_close(l32, l64, 1e-5, 0.0, "loss")
    assert_close(g32, g64, 1e-5, 0.0, "grad")



def test_bank_tile_for_gpus_with_64kb_shared_memory():
    """sm_75 (T4) gets 16-row, unpipelined tiles (the default one does not fit there)."""
    from sepico_fast.kernels import bank_contrast as bc
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        small = bc.kernel_config(dt, 512, 19, 200, capability=(7, 5))
        assert small["BLOCK_N"] == 16 and small["num_stages"] == 1
    default = bc.kernel_config(torch.float16, 512, 19, 200, capability=(9, 0))
    assert default == bc.kernel_config(torch.float16, 512, 19, 200)
    assert default["BLOCK_N"] == 32 and default["num_stages"] == 2
    assert bc.kernel_config(torch.float16, 512, 19, 200, capability=(7, 5), block_n=32)["BLOCK_N"] == 32
