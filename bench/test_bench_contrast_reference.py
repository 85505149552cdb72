"""Reference (sepico_fast.contrast, impl="torch") vs the upstream formulation (bench/upstream.py).

Shape of one DAFormer-style source batch at feature resolution on the CPU: N = 12,800
prepared pixels (10% ignore), A = 512, C = 19. Two ops:

* ``stats_update``: one ClassStats.update (no autograd);
* ``distcl_fwd_bwd``: DistCL with the regulariser, forward + backward w.r.t. the features.

Each row in ``bench/results/contrast_reference.json`` carries the median time and the peak
extra memory of one call; reference rows also carry the time and memory ratios against
the upstream row measured in the same run. ``bytes_moved`` is the unavoidable traffic
(read z; for the backward also read z and write dz), so roofline_pct says how far each
formulation is from a single pass.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from bench.record import cpu_peak_memory_mb, median_time_ms, peak_memory_mb, record
from bench.upstream import UpstreamStats, upstream_dist_contrast_loss
from sepico_fast.contrast import ClassStats, dist_contrast_loss
from sepico_fast.contrast.losses import dist_contrast_loss_torch
from sepico_fast.contrast.stats import class_moments_torch, merge_batch

N, A, C, IGNORE = 12_800, 512, 19, 255
BENCH = "contrast_reference"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: GPU rows not measured"))]

_upstream: dict[tuple[str, str], tuple[float, float | None]] = {}  # (op, device) -> (ms, MB)


def make_batches(device, count=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        feat = F.normalize(torch.randn(N, A, generator=g), dim=1)
        labels = torch.randint(0, C, (N,), generator=g)
        labels[torch.rand(N, generator=g) < 0.1] = IGNORE
        out.append((feat.to(device), labels.to(device)))
    return out


def make_statistics(device):
    g = torch.Generator().manual_seed(1)
    mean = F.normalize(torch.randn(C, A, generator=g), dim=1).to(device)
    var = (0.01 * torch.rand(C, A, generator=g)).to(device)
    return mean, var


def peak_mb(fn, device):
    return cpu_peak_memory_mb(fn) if torch.device(device).type == "cpu" else peak_memory_mb(fn, device)


def measure(fn, device):
    ms = median_time_ms(fn, device, warmup=2, repeats=5)
    return ms, peak_mb(lambda: fn(0), device)


def ratios(op, device, ms, mb):
    # The load average tells a reader whether other processes shared the CPU.
    out = {"loadavg_1m": round(os.getloadavg()[0], 2)}
    base = _upstream.get((op, device))
    if base is None:
        return out
    out["speedup_vs_upstream"] = round(base[0] / ms, 2)
    if mb and base[1]:
        out["memory_ratio_vs_upstream"] = round(base[1] / mb, 2)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_stats_update(device):
    batches = make_batches(device)
    shape = {"op": "stats_update", "N": N, "A": A, "C": C}
    upstream = UpstreamStats(C, A, device=device)
    reference = ClassStats(C, A, device=device, impl="torch")
    # Same mathematics: one update from the same state agrees.
    upstream.update(*batches[0])
    reference.update(*batches[0])
    torch.testing.assert_close(reference.mean, upstream.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.var, upstream.var, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(reference.count, upstream.count)

    ms, mb = measure(lambda i: upstream.update(*batches[i % len(batches)]), device)
    _upstream[("stats_update", device)] = (ms, mb)
    record(BENCH, "upstream", device, shape, ms, bytes_moved=N * A * 4, peak_mem_mb=mb,
           extra=ratios("-", device, ms, mb))
    ms, mb = measure(lambda i: reference.update(*batches[i % len(batches)]), device)
    record(BENCH, "reference", device, shape, ms, bytes_moved=N * A * 4, peak_mem_mb=mb,
           extra=ratios("stats_update", device, ms, mb))


@pytest.mark.parametrize("device", DEVICES)
def test_distcl_fwd_bwd(device):
    batches = make_batches(device)
    mean, var = make_statistics(device)
    shape = {"op": "distcl_fwd_bwd", "N": N, "A": A, "C": C}

    def run(loss_fn, i):
        feat, labels = batches[i % len(batches)]
        feat = feat.detach().requires_grad_(True)
        loss = loss_fn(feat, labels)
        loss.backward()
        return loss, feat.grad

    def upstream_loss(feat, labels):
        return upstream_dist_contrast_loss(feat, labels, mean, var, reg_weight=1.0)

    def reference_loss(feat, labels):
        return dist_contrast_loss(feat, labels, mean, var, reg_weight=1.0, impl="torch")

    (lu, gu), (lr, gr) = run(upstream_loss, 0), run(reference_loss, 0)
    torch.testing.assert_close(lr, lu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gr, gu, rtol=1e-4, atol=1e-9)

    moved = 3 * N * A * 4
    ms, mb = measure(lambda i: run(upstream_loss, i), device)
    _upstream[("distcl_fwd_bwd", device)] = (ms, mb)
    record(BENCH, "upstream", device, shape, ms, bytes_moved=moved, peak_mem_mb=mb,
           extra=ratios("-", device, ms, mb))
    ms, mb = measure(lambda i: run(reference_loss, i), device)
    record(BENCH, "reference", device, shape, ms, bytes_moved=moved, peak_mem_mb=mb,
           extra=ratios("distcl_fwd_bwd", device, ms, mb))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_reference(device):
    """torch.compile of the reference math (stats update and DistCL fwd+bwd)."""
    batches = make_batches(device)
    mean, var = make_statistics(device)
    count = torch.zeros(C, device=device)
    state_mean, state_var = torch.zeros(C, A, device=device), torch.zeros(C, A, device=device)

    def stats_step(feat, labels):
        return merge_batch(count, state_mean, state_var,
                           *class_moments_torch(feat, labels, C, IGNORE))

    def loss_step(feat, labels):
        return dist_contrast_loss_torch(feat, labels, mean, var, 100.0, 1.0, 1.0, IGNORE)

    try:
        stats_c = torch.compile(stats_step, dynamic=False)
        loss_c = torch.compile(loss_step, dynamic=False)
        got = stats_c(*batches[0])
        feat = batches[0][0].detach().requires_grad_(True)
        loss_c(feat, batches[0][1]).backward()
    except Exception as exc:  # inductor needs a working C++ (CPU) or Triton (GPU) toolchain
        pytest.skip(f"torch.compile does not work here: {type(exc).__name__}: {exc}"[:300])
    want = stats_step(*batches[0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)

    def run_loss(i):
        feat, labels = batches[i % len(batches)]
        feat = feat.detach().requires_grad_(True)
        loss_c(feat, labels).backward()

    ms, mb = measure(lambda i: stats_c(*batches[i % len(batches)]), device)
    shape = {"op": "stats_update", "N": N, "A": A, "C": C}
    record(BENCH, "reference_compiled", device, shape, ms, bytes_moved=N * A * 4, peak_mem_mb=mb,
           extra=ratios("stats_update", device, ms, mb))
    ms, mb = measure(run_loss, device)
    shape = {"op": "distcl_fwd_bwd", "N": N, "A": A, "C": C}
    record(BENCH, "reference_compiled", device, shape, ms, bytes_moved=3 * N * A * 4,
           peak_mem_mb=mb, extra=ratios("distcl_fwd_bwd", device, ms, mb))
