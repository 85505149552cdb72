"""ProtoCL / DistCL / BankCL against independent float64 formulations written here.

The formulations below follow method §5 literally (explicit softmax, DistCL in its
"CE + gathered variance term" form, BankCL with per-entry similarities averaged for
the negatives and an explicit loop over pixels), so they share no code or algebra
shortcut with the implementation under test.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from sepico_fast.contrast import bank_contrast_loss, dist_contrast_loss, proto_contrast_loss
from sepico_fast.contrast.losses import bank_contrast_loss_torch, dist_contrast_loss_torch, proto_contrast_loss_torch

IGNORE = 255


# ----------------------------------------------------------------- float64 formulations

def ref_regulariser(z, labels, mean, tau):
    valid = [i for i in range(z.shape[0]) if labels[i] != IGNORE]
    if not valid:
        return z.sum() * 0.0
    z_bar = z[valid].mean(0)
    logits = torch.stack([z_bar @ mean[c] for c in range(mean.shape[0])]) / tau
    log_softmax = logits - torch.log(torch.exp(logits).sum())
    num_classes = mean.shape[0]
    return log_softmax.sum() / (num_classes * math.log(num_classes))


def ref_proto(z, labels, mean, tau, reg_weight):
    terms = []
    for i in range(z.shape[0]):
        y = int(labels[i])
        if y == IGNORE:
            continue
        logits = (mean @ z[i]) / tau
        terms.append(-torch.log(torch.exp(logits[y]) / torch.exp(logits).sum()))
    ce = torch.stack(terms).mean() if terms else z.sum() * 0.0
    reg = ref_regulariser(z, labels, mean, tau) if terms else z.sum() * 0.0
    return ce + reg_weight * reg


def ref_dist(z, labels, mean, var, tau, ratio, reg_weight):
    terms = []
    for i in range(z.shape[0]):
        y = int(labels[i])
        if y == IGNORE:
            continue
        s = torch.stack([(z[i] @ mean[c] + 0.5 * (z[i] ** 2 * var[c]).sum() * ratio / tau) / tau
                         for c in range(mean.shape[0])])
        ce = -torch.log(torch.exp(s[y]) / torch.exp(s).sum())
        terms.append(ce + 0.5 * (z[i] ** 2 * var[y]).sum() * ratio / tau ** 2)
    ce = torch.stack(terms).mean() if terms else z.sum() * 0.0
    reg = ref_regulariser(z, labels, mean, tau) if terms else z.sum() * 0.0
    return ce + reg_weight * reg


def ref_bank(z, labels, bank, bank_len, tau, mean, reg_weight):
    num_classes = bank.shape[0]
    terms = []
    any_valid = False
    for i in range(z.shape[0]):
        y = int(labels[i])
        if y == IGNORE:
            continue
        any_valid = True
        own = int(bank_len[y])
        if own == 0:  # no positive: pixel left out of the mean (documented choice)
            continue
        neg = [torch.stack([z[i] @ bank[k, j] / tau for j in range(int(bank_len[k]))]).mean()
               for k in range(num_classes) if k != y and int(bank_len[k]) > 0]
        entry_losses = []
        for j in range(own):
            p = z[i] @ bank[y, j] / tau
            denominator = torch.exp(p) + (torch.exp(torch.stack(neg)).sum() if neg else 0.0)
            entry_losses.append(-torch.log(torch.exp(p) / denominator))
        terms.append(torch.stack(entry_losses).mean())
    ce = torch.stack(terms).mean() if terms else z.sum() * 0.0
    if reg_weight and any_valid:
        ce = ce + reg_weight * ref_regulariser(z, labels, mean, tau)
    return ce


# -------------------------------------------------------------------------- inputs

def make_inputs(n, dim, num_classes, seed, *, ignore_frac=0.2, absent=(), bank_m=4):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    present = [c for c in range(num_classes) if c not in absent]
    labels = torch.tensor(present)[torch.randint(0, len(present), (n,), generator=g)]
    labels[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    mean = F.normalize(torch.randn(num_classes, dim, generator=g, dtype=torch.float64), dim=1)
    mean = mean * torch.rand(num_classes, 1, generator=g, dtype=torch.float64)
    var = 0.3 * torch.rand(num_classes, dim, generator=g, dtype=torch.float64)
    bank = 0.5 * torch.randn(num_classes, bank_m, dim, generator=g, dtype=torch.float64)
    bank_len = torch.randint(0, bank_m + 1, (num_classes,), generator=g)
    return z, labels, mean, var, bank, bank_len


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


CASES = [  # n, dim, classes, temperature, reg_weight, absent classes
    (37, 13, 5, 0.7, 0.0, (4,)),
    (37, 13, 5, 0.7, 1.0, (1,)),
    (29, 13, 5, 100.0, 1.0, ()),
    (23, 7, 3, 0.5, -0.5, ()),
    (48, 512, 19, 100.0, 1.0, (3, 7, 18)),
    (48, 512, 19, 0.3, 1.0, (0,)),
]


@pytest.mark.parametrize("n,dim,classes,tau,reg,absent", CASES)
def test_proto_matches_float64_formulation(n, dim, classes, tau, reg, absent):
    z, labels, mean, *_ = make_inputs(n, dim, classes, seed=n + dim, absent=absent)
    got, got_grad = value_and_grad(lambda x: proto_contrast_loss(
        x, labels, mean, temperature=tau, reg_weight=reg), z)
    want, want_grad = value_and_grad(lambda x: ref_proto(x, labels, mean, tau, reg), z)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,dim,classes,tau,reg,absent", CASES)
@pytest.mark.parametrize("ratio", [1.0, 2.5])
def test_dist_matches_float64_formulation(n, dim, classes, tau, reg, absent, ratio):
    z, labels, mean, var, *_ = make_inputs(n, dim, classes, seed=3 * n + dim, absent=absent)
    got, got_grad = value_and_grad(lambda x: dist_contrast_loss(
        x, labels, mean, var, temperature=tau, ratio=ratio, reg_weight=reg), z)
    want, want_grad = value_and_grad(lambda x: ref_dist(x, labels, mean, var, tau, ratio, reg), z)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,dim,classes,tau,reg,absent", CASES)
def test_bank_matches_float64_formulation(n, dim, classes, tau, reg, absent):
    z, labels, mean, _, bank, bank_len = make_inputs(n, dim, classes, seed=5 * n + dim,
                                                     absent=absent)
    got, got_grad = value_and_grad(lambda x: bank_contrast_loss(
        x, labels, bank, bank_len, temperature=tau, mean=mean, reg_weight=reg), z)
    want, want_grad = value_and_grad(lambda x: ref_bank(x, labels, bank, bank_len, tau, mean,
                                                        reg), z)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_bank_edge_cases_match_formulation():
    """Own-class bank empty, all other banks empty (no negatives), full banks, M = 1."""
    z, labels, mean, _, bank, _ = make_inputs(30, 6, 4, seed=11, ignore_frac=0.1)
    for bank_len in ([0, 4, 4, 4], [4, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]):
        bank_len = torch.tensor(bank_len)
        got, got_grad = value_and_grad(lambda x: bank_contrast_loss(
            x, labels, bank, bank_len, temperature=0.6, mean=mean, reg_weight=1.0), z)
        want, want_grad = value_and_grad(lambda x: ref_bank(x, labels, bank, bank_len, 0.6, mean,
                                                            1.0), z)
        assert torch.isfinite(got) and torch.isfinite(got_grad).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    # Only one non-empty bank and every pixel of that class: no negatives -> CE part is 0.
    labels = torch.zeros(30, dtype=torch.long)
    loss = bank_contrast_loss(z, labels, bank, torch.tensor([3, 0, 0, 0]), temperature=0.6)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # M = 1, the initial state of ClassStats (one zero row per class).
    bank0 = torch.zeros(4, 1, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(0))
    got = bank_contrast_loss(z, labels, bank0, torch.ones(4, dtype=torch.long), temperature=0.6)
    assert got.item() == pytest.approx(math.log(4.0), rel=1e-6)  # p = n_k = 0 for all k


def test_float32_and_half_inputs():
    z, labels, mean, var, bank, bank_len = make_inputs(64, 32, 6, seed=2)
    want = ref_dist(z, labels, mean, var, 0.8, 1.0, 1.0)
    got32 = dist_contrast_loss(z.float(), labels, mean.float(), var.float(), temperature=0.8,
                               reg_weight=1.0)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        zh = z.to(dtype)
        got = dist_contrast_loss(zh, labels, mean.float(), var.float(), temperature=0.8,
                                 reg_weight=1.0)
        assert got.dtype == torch.float32 and got.dim() == 0
        # Computed in float32 from the rounded half inputs.
        want_h = ref_dist(zh.double(), labels, mean.float().double(), var.float().double(),
                          0.8, 1.0, 1.0)
        torch.testing.assert_close(got.double(), want_h, rtol=1e-5, atol=1e-6)
        for fn in (lambda x: proto_contrast_loss(x, labels, mean.to(dtype), reg_weight=1.0),
                   lambda x: bank_contrast_loss(x, labels, bank.to(dtype), bank_len,
                                                mean=mean, reg_weight=1.0)):
            x = zh.clone().requires_grad_(True)
            out = fn(x)
            out.backward()
            assert out.dtype == torch.float32 and x.grad.dtype == dtype
            assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("n", [0, 9])
def test_no_valid_pixel_gives_connected_zero(n):
    z, labels, mean, var, bank, bank_len = make_inputs(max(n, 1), 8, 4, seed=4)
    z, labels = z[:n].float(), torch.full((n,), IGNORE, dtype=torch.long)
    calls = [
        lambda x: proto_contrast_loss(x, labels, mean.float(), reg_weight=1.0),
        lambda x: dist_contrast_loss(x, labels, mean.float(), var.float(), reg_weight=1.0),
        lambda x: bank_contrast_loss(x, labels, bank.float(), bank_len, mean=mean.float(),
                                     reg_weight=1.0),
    ]
    for fn in calls:
        x = z.clone().requires_grad_(True)
        loss = fn(x)
        assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() == 0.0
        assert loss.requires_grad
        loss.backward()
        assert x.grad is not None and x.grad.shape == x.shape and (x.grad == 0).all()


def test_ignored_pixels_do_not_leak():
    """NaN features at ignored pixels change neither the loss nor the other gradients."""
    z, labels, mean, var, bank, bank_len = make_inputs(20, 8, 4, seed=6, ignore_frac=0.3)
    labels[0] = IGNORE
    dirty = z.clone()
    dirty[labels == IGNORE] = float("nan")
    for fn in (lambda x: proto_contrast_loss(x, labels, mean, reg_weight=1.0),
               lambda x: dist_contrast_loss(x, labels, mean, var, reg_weight=1.0),
               lambda x: bank_contrast_loss(x, labels, bank, bank_len, mean=mean, reg_weight=1.0)):
        clean_loss, clean_grad = value_and_grad(fn, z)
        dirty_loss, dirty_grad = value_and_grad(fn, dirty)
        assert torch.equal(clean_loss, dirty_loss)
        assert torch.equal(clean_grad, dirty_grad)
        assert (clean_grad[labels == IGNORE] == 0).all()


def test_gradcheck_float64_references():
    z, labels, mean, var, bank, bank_len = make_inputs(7, 5, 3, seed=8, ignore_frac=0.2)
    bank_len = torch.tensor([2, 0, 4])
    z = z.clone().requires_grad_(True)
    mean_g = mean.clone().requires_grad_(True)
    var_g = var.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, m: proto_contrast_loss_torch(x, labels, m, 0.7, 1.0), (z, mean_g))
    assert torch.autograd.gradcheck(
        lambda x, m, v: dist_contrast_loss_torch(x, labels, m, v, 0.7, 1.5, 1.0), (z, mean_g, var_g))
    assert torch.autograd.gradcheck(
        lambda x: bank_contrast_loss_torch(x, labels, bank, bank_len, 0.7, mean, 1.0), (z,))


def test_temperature_is_a_divisor_and_reg_sign():
    z, labels, mean, var, *_ = make_inputs(16, 8, 4, seed=9)
    base = proto_contrast_loss(z, labels, mean, temperature=2.0)
    scaled = proto_contrast_loss(z, labels, mean * 3.0, temperature=6.0)
    torch.testing.assert_close(base, scaled)
    plus = proto_contrast_loss(z, labels, mean, temperature=2.0, reg_weight=1.0)
    minus = proto_contrast_loss(z, labels, mean, temperature=2.0, reg_weight=-1.0)
    torch.testing.assert_close(plus + minus, 2 * base)
    r = ref_regulariser(z, labels, mean, 2.0)
    assert r.item() < 0  # log-probabilities: the quirk adds a negative term
    torch.testing.assert_close((plus - base).double(), r, rtol=1e-5, atol=1e-7)


def test_dist_with_zero_variance_equals_proto():
    z, labels, mean, var, *_ = make_inputs(25, 9, 5, seed=10)
    torch.testing.assert_close(dist_contrast_loss(z, labels, mean, torch.zeros_like(var),
                                                  temperature=0.9, reg_weight=1.0),
                               proto_contrast_loss(z, labels, mean, temperature=0.9,
                                                   reg_weight=1.0))


# ------------------------------------------------------------------------- validation

def _base():
    z, labels, mean, var, bank, bank_len = make_inputs(10, 6, 4, seed=12)
    return z.float(), labels, mean.float(), var.float(), bank.float(), bank_len


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(z=a["z"][0]), "2-D"),
    (lambda a: a.update(z=a["z"].long()), "floating"),
    (lambda a: a.update(labels=a["labels"][:-1]), "entries"),
    (lambda a: a.update(labels=a["labels"].float()), "integer"),
    (lambda a: a.update(labels=a["labels"][:, None]), "1-D"),
    (lambda a: a["labels"].__setitem__(0, 4), "0..3"),
    (lambda a: a["labels"].__setitem__(0, -1), "0..3"),
    (lambda a: a.update(mean=a["mean"][:, :-1]), "mean"),
    (lambda a: a.update(var=a["var"][:-1]), "var"),
    (lambda a: a["mean"].__setitem__((1, 1), float("nan")), "NaN"),
    (lambda a: a["var"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
    (lambda a: a.update(temperature=0.0), "temperature"),
    (lambda a: a.update(ignore_index=2), "ignore_index"),
])
def test_dist_validation(mutate, match):
    z, labels, mean, var, _, _ = _base()
    args = {"z": z, "labels": labels.clone(), "mean": mean.clone(), "var": var.clone(),
            "temperature": 100.0, "ignore_index": IGNORE}
    mutate(args)
    with pytest.raises(ValueError, match=match):
        dist_contrast_loss(args["z"], args["labels"], args["mean"], args["var"],
                           temperature=args["temperature"], ignore_index=args["ignore_index"])


def test_proto_and_bank_validation():
    z, labels, mean, var, bank, bank_len = _base()
    with pytest.raises(ValueError, match="mean"):
        proto_contrast_loss(z, labels, mean[:, :3])
    with pytest.raises(ValueError, match="0..3"):
        proto_contrast_loss(z, torch.full_like(labels, 7), mean)
    with pytest.raises(ValueError, match="bank must be"):
        bank_contrast_loss(z, labels, bank[..., :2], bank_len)
    with pytest.raises(ValueError, match="bank_len must be a"):
        bank_contrast_loss(z, labels, bank, bank_len[:2])
    with pytest.raises(ValueError, match="integer"):
        bank_contrast_loss(z, labels, bank, bank_len.float())
    with pytest.raises(ValueError, match="0..4"):
        bank_contrast_loss(z, labels, bank, bank_len + 5)
    bad = bank.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bank_contrast_loss(z, labels, bad, bank_len)
    with pytest.raises(ValueError, match="mean="):
        bank_contrast_loss(z, labels, bank, bank_len, reg_weight=1.0)
    with pytest.raises(ValueError, match="mean"):
        bank_contrast_loss(z, labels, bank, bank_len, mean=mean[:2], reg_weight=1.0)


# ------------------------------------------------------------------------ impl switch

def test_impl_names():
    z, labels, mean, var, bank, bank_len = _base()
    for impl in ("fast", "TORCH"):
        with pytest.raises(ValueError, match="impl must be"):
            dist_contrast_loss(z, labels, mean, var, impl=impl)
    with pytest.raises(ValueError, match="available impls: torch, triton"):
        proto_contrast_loss(z, labels, mean, impl="cuda")
    with pytest.raises(ValueError, match="available impls"):
        bank_contrast_loss(z, labels, bank, bank_len, impl="cuda")
    # None on CPU tensors is the torch reference.
    torch.testing.assert_close(dist_contrast_loss(z, labels, mean, var, impl=None),
                               dist_contrast_loss(z, labels, mean, var, impl="torch"))


def test_impl_none_picks_by_device_and_dtype():
    """None -> triton only for CUDA tensors of a dtype the kernels take; float64 stays on
    the torch reference (the kernels reject it)."""
    from sepico_fast.dispatch import resolve_impl
    cuda = torch.device("cuda")  # only a device object: nothing is allocated on it
    assert resolve_impl("dist_contrast_loss", None, torch.device("cpu"), dtype=torch.float32) == "torch"
    assert resolve_impl("dist_contrast_loss", None, cuda, dtype=torch.float64) == "torch"
    try:
        importlib.import_module("sepico_fast.kernels")
    except Exception as exc:  # pragma: no cover - depends on triton being importable
        pytest.skip(f"sepico_fast.kernels does not import here: {exc}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_impl("dist_contrast_loss", None, cuda, dtype=dtype) == "triton"


def test_triton_dispatch_passes_validated_arguments(monkeypatch):
    """impl="triton" forwards to sepico_fast.kernels.<op> (stubbed here: the kernels are
    tested in their own files) with the positional order of docs/ARCHITECTURE.md."""
    try:
        kernels = importlib.import_module("sepico_fast.kernels")
    except Exception as exc:  # pragma: no cover - depends on triton being importable
        pytest.skip(f"sepico_fast.kernels does not import here: {exc}")
    seen = {}

    def fake(name):
        def fn(*args):
            seen[name] = args
            return torch.tensor(1.5, dtype=torch.float64)
        return fn

    for name in ("dist_contrast_loss", "proto_contrast_loss", "bank_contrast_loss"):
        monkeypatch.setattr(kernels, name, fake(name), raising=False)
    z, labels, mean, var, bank, bank_len = _base()
    out = dist_contrast_loss(z, labels, mean, var, temperature=50, ratio=2, reg_weight=1,
                             impl="triton")
    assert out.dtype == torch.float32 and out.dim() == 0 and out.item() == 1.5
    assert seen["dist_contrast_loss"][4:] == (50.0, 2.0, 1.0, IGNORE)
    proto_contrast_loss(z, labels, mean, temperature=7, impl="triton")
    assert seen["proto_contrast_loss"][3:] == (7.0, 0.0, IGNORE)
    bank_contrast_loss(z, labels, bank, bank_len, mean=mean, reg_weight=2, impl="triton")
    assert seen["bank_contrast_loss"][4] == 100.0 and seen["bank_contrast_loss"][5] is mean
    assert seen["bank_contrast_loss"][6:] == (2.0, IGNORE)
    # Bad input is rejected before the kernel is reached.
    with pytest.raises(ValueError):
        dist_contrast_loss(z, labels[:3], mean, var, impl="triton")


def test_triton_missing_kernel_is_a_clear_error(monkeypatch):
    try:
        kernels = importlib.import_module("sepico_fast.kernels")
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"sepico_fast.kernels does not import here: {exc}")
    monkeypatch.delattr(kernels, "proto_contrast_loss", raising=False)
    z, labels, mean, *_ = _base()
    with pytest.raises(ImportError, match="impl='triton'"):
        proto_contrast_loss(z, labels, mean, impl="triton")
