"""Triton class_moments (ClassStats.update batch moments, method §4) vs float64 and torch.

Runs in Triton's interpreter on the CPU; block sizes and the number of row groups are
forced small so that the in-kernel Chan merge of row blocks and the cross-program merge
are both exercised.
"""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("sepico_fast.kernels")

IGNORE = 255
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def moments64(z, y, c):
    """Two-pass float64 moments, one class at a time."""
    z = z.double()
    a = z.shape[1]
    count = torch.zeros(c, dtype=torch.float64)
    mean = torch.zeros(c, a, dtype=torch.float64)
    m2 = torch.zeros(c, a, dtype=torch.float64)
    for k in range(c):
        zk = z[y == k]
        if len(zk):
            count[k] = len(zk)
            mean[k] = zk.mean(0)
            m2[k] = ((zk - mean[k]) ** 2).sum(0)
    return count, mean, m2


def make(n, a, c, seed, offset=0.0, dtype=torch.float32, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, a, generator=g, dtype=torch.float64), dim=1) + offset
    y = torch.randint(0, c, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    if c > 2:
        y[y == 2] = 1  # an absent class: count 0, mean 0, m2 0
    return z.to(dtype), y


def check(actual, expected, rtol, what):
    exp = expected.double()
    err = (actual.double().cpu() - exp).abs().max()
    scale = exp.abs().max().clamp_min(1e-30)
    assert bool(err <= rtol * scale), f"{what}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("n,a,c,block_n,groups", [
    (37, 16, 5, 16, 1),     # one program walks three row blocks (in-kernel Chan merge)
    (150, 64, 19, 32, 2),   # two programs, partial last block
    (300, 512, 19, 64, 3),  # several column chunks
    (260, 64, 5, 16, None),  # the launcher's default grouping
])
def test_fp32_matches_float64(n, a, c, block_n, groups):
    z, y = make(n, a, c, seed=n + a)
    count, mean, m2 = kernels.class_moments(z.to(DEV), y.to(DEV), c, IGNORE, block_n=block_n,
                                            num_groups=groups)
    rc, rm, rm2 = moments64(z, y, c)
    assert count.dtype == mean.dtype == m2.dtype == torch.float32
    assert count.shape == (c,) and mean.shape == (c, a) and m2.shape == (c, a)
    assert torch.equal(count.cpu().double(), rc)
    check(mean, rm, 1e-6, "mean")
    check(m2, rm2, 1e-5, "m2")


def test_centred_moments_survive_a_large_offset():
    """Features with a large common offset: E[z²]−E[z]² would lose every digit in fp32."""
    z, y = make(200, 16, 5, seed=4, offset=300.0, dtype=torch.float64)
    count, mean, m2 = kernels.class_moments(z.float().to(DEV), y.to(DEV), 5, IGNORE, block_n=16,
                                            num_groups=3)
    rc, rm, rm2 = moments64(z.float(), y, 5)
    check(mean, rm, 1e-6, "mean")
    check(m2, rm2, 1e-3, "m2")  # Chan δ of fp32 block means near 300: ~5e-5 relative; E[z²]−E[z]² ~10 %


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    z, y = make(150, 64, 19, seed=8, dtype=dtype)
    count, mean, m2 = kernels.class_moments(z.to(DEV), y.to(DEV), 19, IGNORE, block_n=32,
                                            num_groups=2)
    rc, rm, rm2 = moments64(z.float(), y, 19)  # moments of the rounded features
    assert torch.equal(count.cpu().double(), rc)
    check(mean, rm, 1e-6, "mean")
    check(m2, rm2, 1e-3, "m2")  # TF32 centring/squares on a GPU: ~5e-4 relative


def test_empty_and_all_ignored():
    for n in (0, 33):
        z = torch.randn(n, 16, device=DEV)
        y = torch.full((n,), IGNORE, dtype=torch.long, device=DEV)
        count, mean, m2 = kernels.class_moments(z, y, 5, IGNORE, block_n=16)
        assert count.shape == (5,) and mean.shape == (5, 16) and m2.shape == (5, 16)
        assert not bool(count.any()) and not bool(mean.any()) and not bool(m2.any())


def test_deterministic_flag_same_bits_and_strided_input():
    z, y = make(120, 64, 5, seed=2)
    zt = z.T.contiguous().to(DEV).T  # column-major view
    out1 = kernels.class_moments(zt, y.to(DEV), 5, IGNORE, deterministic=False)
    out2 = kernels.class_moments(z.to(DEV), y.to(DEV), 5, IGNORE, deterministic=True)
    for t1, t2 in zip(out1, out2):
        assert torch.equal(t1, t2)
    rc, rm, rm2 = moments64(z, y, 5)
    check(out1[2], rm2, 1e-5, "m2")


def test_matches_contrast_torch_reference_and_classstats():
    """Same batch moments as sepico_fast.contrast's torch reference; ClassStats(impl="triton")
    tracks ClassStats(impl="torch") over several updates (bank pushes included)."""
    stats_mod = pytest.importorskip("sepico_fast.contrast.stats")
    from sepico_fast.contrast import ClassStats

    z, y = make(140, 64, 19, seed=6)
    ours = kernels.class_moments(z.to(DEV), y.to(DEV), 19, IGNORE)
    ref = stats_mod.class_moments_torch(z.to(DEV), y.to(DEV), 19, IGNORE)
    for o, r, name in zip(ours, ref, ("count", "mean", "m2")):
        check(o, r, 1e-5, name)

    s_tri = ClassStats(19, 64, memory_length=3, device=DEV, impl="triton")
    s_ref = ClassStats(19, 64, memory_length=3, device=DEV, impl="torch")
    for seed in range(3):
        z, y = make(100, 64, 19, seed=30 + seed)
        s_tri.update(z.to(DEV), y.to(DEV))
        s_ref.update(z.to(DEV), y.to(DEV))
    assert torch.equal(s_tri.count, s_ref.count)
    assert torch.equal(s_tri.bank_len, s_ref.bank_len)
    for name in ("mean", "var", "bank"):
        check(getattr(s_tri, name), getattr(s_ref, name), 1e-5, name)
