"""Triton kernels vs the torch reference vs torch.compile of it vs the upstream formulation.

    pytest bench/test_bench_kernels.py -s

Shapes (method §9): N ∈ {12,800, 51,200, 204,800} prepared pixels (10 % ignore), A = 512,
C = 19, M = 200 bank rows per class; bf16 features on the GPU (the AMP training path),
fp32 statistics. Bench names (one JSON file each under bench/results/):

* ``dist_contrast_fwd_bwd``, ``proto_contrast_fwd_bwd``, ``bank_contrast_fwd_bwd``:
  loss with the regulariser, forward + backward w.r.t. the features;
* ``class_stats_update``: one ``ClassStats.update`` (batch moments + method §4 merge).

Impls: ``triton`` (``sepico_fast.contrast`` with impl="triton"; dL/dz stored by the forward
kernel), ``triton_recompute`` (DistCL/ProtoCL kernels with grad_mode="recompute": dL/dz
recomputed by the backward kernel), ``torch`` (impl="torch"),
``torch_compile`` (``torch.compile`` of the reference functions), ``upstream``
(``bench/upstream.py``: dense N×C×A statistics, DistCL as separate ops; ProtoCL is the same
code with σ² = 0; BankCL: a direct separate-ops formulation, one class at a time with a
boolean mask each and a product with every bank entry — method §9 does not describe
upstream's own BankCL). ``gbps`` uses the *minimum* traffic of the op — read z
once, write dL/dz once (losses), plus labels and the small [C,A] / [C,M,A] tensors — so
``roofline_pct`` (against the measured device copy bandwidth) says how close an impl is to a
single pass. Every impl is checked against the reference before it is timed; inputs rotate
over several buffers so the L2 cache does not hold the next call's features.

Times (``bench.record.kernel_timings``): ``median_ms`` is the time per call of many
back-to-back calls between one pair of CUDA events (``calls_per_event`` of them, about
2 ms of work), which is what a training step sees; ``single_call_ms`` times one
synchronised call at a time (launch latency and sync included: for these microsecond
kernels mostly overhead); ``graph_ms`` replays the same calls from one CUDA graph (no
launch overhead at all; ``graph_error`` says why a row has none, e.g. upstream's host
syncs). The upstream DistCL/ProtoCL rows get float32 features (the bf16 features
upcast): upstream's code is fp32 and mixes no dtypes; their ``shape.dtype`` and byte
count say so.

On the CPU only the torch and upstream rows of the smallest N run: Triton there is its
interpreter (timings meaningless) and the GPU-sized cases would take minutes each.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from bench.record import cpu_peak_memory_mb, kernel_timings, peak_memory_mb, record

A, C, M, IGNORE = 512, 19, 200, 255
SIZES = [12_800, 51_200, 204_800]
IMPLS = ["triton", "triton_recompute", "torch", "torch_compile", "upstream"]
BENCHES = ["dist_contrast_fwd_bwd", "proto_contrast_fwd_bwd", "bank_contrast_fwd_bwd",
           "class_stats_update"]
GPU = torch.cuda.is_available()


def _upstream_module():
    try:
        return importlib.import_module("bench.upstream")
    except ImportError as exc:
        pytest.skip(f"bench/upstream.py is not available: {exc}")


def _skip_reason(bench: str, device: str, impl: str, n: int) -> str | None:
    if device == "cuda" and not GPU:
        return "no CUDA GPU on this machine: GPU rows not measured"
    if device == "cpu":
        if impl.startswith("triton"):
            return "Triton on the CPU is its interpreter: timings are meaningless"
        if impl == "torch_compile":
            return "torch.compile rows are GPU-only here (CPU rows: bench/test_bench_contrast_reference.py)"
        if n != SIZES[0]:
            return "CPU rows only at the smallest N (the larger ones take minutes per call)"
        if impl == "upstream" and bench == "bank_contrast_fwd_bwd":
            return "the separate-ops BankCL multiplies every pixel with all C·M bank rows: minutes per call on the CPU"
    return None


# ----------------------------------------------------------------------------- inputs
def make_inputs(n: int, device: torch.device, dtype: torch.dtype, buffers: int):
    """``buffers`` independent (feat, labels) pairs plus fp32 statistics and a full bank."""
    g = torch.Generator().manual_seed(n)
    pairs = []
    for _ in range(buffers):
        feat = F.normalize(torch.randn(n, A, generator=g), dim=1).to(device=device, dtype=dtype)
        labels = torch.randint(0, C, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.1] = IGNORE
        pairs.append((feat, labels.to(device)))
    mean = (0.8 * F.normalize(torch.randn(C, A, generator=g), dim=1)).to(device)
    var = (2e-3 * torch.rand(C, A, generator=g)).to(device)
    bank = F.normalize(torch.randn(C, M, A, generator=g), dim=2).to(device)
    bank_len = torch.full((C,), M, dtype=torch.long, device=device)
    return pairs, mean, var, bank, bank_len


def min_bytes(bench: str, n: int, elem: int) -> float:
    """Unavoidable traffic: z once (+ dL/dz once for losses), labels, small statistics."""
    feat = n * A * elem
    labels = n * 8
    stats = 2 * C * A * 4
    if bench == "class_stats_update":
        return feat + labels + 3 * stats  # read state, write state
    extra = C * M * A * 4 if bench == "bank_contrast_fwd_bwd" else 0
    return 2 * feat + labels + stats + extra


def min_flops(bench: str, n: int) -> float | None:
    if bench == "dist_contrast_fwd_bwd":
        return 8.0 * n * A * C  # z·μ, z²·σ² forward; the two transposed products backward
    if bench == "proto_contrast_fwd_bwd":
        return 4.0 * n * A * C
    if bench == "bank_contrast_fwd_bwd":
        return 4.0 * n * A * (M + C)  # positives and mean-row negatives, fwd + bwd
    return None


# ----------------------------------------------------------------------------- impls
def loss_fn(bench: str, impl: str, mean, var, bank, bank_len):
    """feat, labels -> loss for one (bench, impl); None when the impl has no such op."""
    contrast = importlib.import_module("sepico_fast.contrast")
    losses = importlib.import_module("sepico_fast.contrast.losses")
    if impl in ("triton", "torch"):
        calls = {
            "dist_contrast_fwd_bwd": lambda f, y: contrast.dist_contrast_loss(
                f, y, mean, var, reg_weight=1.0, impl=impl),
            "proto_contrast_fwd_bwd": lambda f, y: contrast.proto_contrast_loss(
                f, y, mean, reg_weight=1.0, impl=impl),
            "bank_contrast_fwd_bwd": lambda f, y: contrast.bank_contrast_loss(
                f, y, bank, bank_len, mean=mean, reg_weight=1.0, impl=impl),
        }
        return calls[bench]
    if impl == "triton_recompute":  # dL/dz recomputed in backward instead of stored
        kernels = importlib.import_module("sepico_fast.kernels")
        if bench == "dist_contrast_fwd_bwd":
            return lambda f, y: kernels.dist_contrast_loss(f, y, mean, var, 100.0, 1.0, 1.0, IGNORE,
                                                           grad_mode="recompute")
        if bench == "proto_contrast_fwd_bwd":
            return lambda f, y: kernels.proto_contrast_loss(f, y, mean, 100.0, 1.0, IGNORE,
                                                            grad_mode="recompute")
        return None
    if impl == "torch_compile":
        refs = {
            "dist_contrast_fwd_bwd": lambda f, y: losses.dist_contrast_loss_torch(
                f, y, mean, var, 100.0, 1.0, 1.0, IGNORE),
            "proto_contrast_fwd_bwd": lambda f, y: losses.proto_contrast_loss_torch(
                f, y, mean, 100.0, 1.0, IGNORE),
            "bank_contrast_fwd_bwd": lambda f, y: losses.bank_contrast_loss_torch(
                f, y, bank, bank_len, 100.0, mean, 1.0, IGNORE),
        }
        return torch.compile(refs[bench], dynamic=False)
    up = _upstream_module()
    if bench == "dist_contrast_fwd_bwd":
        return lambda f, y: up.upstream_dist_contrast_loss(f, y, mean, var, reg_weight=1.0)
    if bench == "proto_contrast_fwd_bwd":
        zero = torch.zeros_like(var)
        return lambda f, y: up.upstream_dist_contrast_loss(f, y, mean, zero, reg_weight=1.0)
    return lambda f, y: up.upstream_bank_contrast_loss(f, y, bank, bank_len, mean=mean, reg_weight=1.0)


def stats_fn(impl: str, device):
    """labels/feat -> one statistics update for ``impl`` (fresh running state per impl)."""
    if impl == "triton_recompute":
        pytest.skip("triton_recompute is a loss-gradient strategy; the statistics have no gradient")
    if impl in ("triton", "torch"):
        from sepico_fast.contrast import ClassStats
        stats = ClassStats(C, A, device=device, impl=impl)
        return stats.update, lambda: (stats.count, stats.mean, stats.var)
    if impl == "torch_compile":
        from sepico_fast.contrast.stats import class_moments_torch, merge_batch
        state = {"count": torch.zeros(C, device=device), "mean": torch.zeros(C, A, device=device),
                 "var": torch.zeros(C, A, device=device)}

        def step(count, mean, var, feat, labels):
            return merge_batch(count, mean, var, *class_moments_torch(feat, labels, C, IGNORE))

        compiled = torch.compile(step, dynamic=False)

        def update(feat, labels):
            state["count"], state["mean"], state["var"] = compiled(
                state["count"], state["mean"], state["var"], feat, labels)
        return update, lambda: (state["count"], state["mean"], state["var"])
    up = _upstream_module()
    stats = up.UpstreamStats(C, A, device=device)
    return stats.update, lambda: (stats.count, stats.mean, stats.var)


# ----------------------------------------------------------------------------- cases
def _timing(device: torch.device) -> dict:
    return {"warmup": 5, "repeats": 30} if device.type == "cuda" else {"warmup": 1, "repeats": 3}


def _peak(fn, device: torch.device):
    return peak_memory_mb(fn, device) if device.type == "cuda" else cpu_peak_memory_mb(fn)


def _close(got, want, rtol, what):
    got, want = got.detach().float(), want.detach().float()
    err = (got - want).abs().max()
    scale = want.abs().max().clamp_min(1e-30)
    assert float(err) <= rtol * float(scale), f"{what}: max err {float(err):.3g} vs {float(scale):.3g}"


def _first_call(impl: str, thunk):
    """Run the first call; a torch.compile that cannot build here skips instead of failing."""
    if impl != "torch_compile":
        return thunk()
    try:
        return thunk()
    except (AssertionError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # inductor needs a working toolchain (C++ on CPU, Triton on GPU)
        pytest.skip(f"torch.compile does not work here: {type(exc).__name__}: {exc}"[:300])


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bench", BENCHES)
def test_bench(bench, impl, n, device):
    reason = _skip_reason(bench, device, impl, n)
    if reason:
        pytest.skip(reason)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    buffers = 4 if dev.type == "cuda" else 2
    pairs, mean, var, bank, bank_len = make_inputs(n, dev, dtype, buffers)
    shape = {"N": n, "A": A, "C": C, "dtype": str(dtype).replace("torch.", "")}
    if bench == "bank_contrast_fwd_bwd":
        shape["M"] = M
    if impl == "upstream" and bench != "class_stats_update":
        # upstream's fp32 code: bf16 features against fp32 statistics would not even run
        # (mm of mixed dtypes); its stats update upcasts by itself
        pairs = [(f.float(), y) for f, y in pairs]
        shape["dtype"] = "float32"
    moved = min_bytes(bench, n, pairs[0][0].element_size())

    try:
        if bench == "class_stats_update":
            update, state = stats_fn(impl, dev)
            ref_update, ref_state = stats_fn("torch", dev)
            _first_call(impl, lambda: update(*pairs[0]))
            ref_update(*pairs[0])
            for got, want, name in zip(state(), ref_state(), ("count", "mean", "var")):
                _close(got, want, 1e-3, f"{impl} {name}")

            def run(i):
                update(*pairs[i % buffers])
        else:
            fn = loss_fn(bench, impl, mean, var, bank, bank_len)
            if fn is None:
                pytest.skip(f"{impl}: no {bench.split('_')[0]} formulation"
                            + (" in bench/upstream.py" if impl == "upstream" else ""))

            def run(i):
                feat = pairs[i % buffers][0].detach().requires_grad_(True)
                loss = fn(feat, pairs[i % buffers][1])
                loss.backward()
                return loss, feat.grad

            ref = loss_fn(bench, "torch", mean, var, bank, bank_len)
            feat = pairs[0][0].detach().requires_grad_(True)
            want = ref(feat, pairs[0][1])
            want.backward()
            got_loss, got_grad = _first_call(impl, lambda: run(0))
            tol = 2e-2 if dtype != torch.float32 else 1e-4  # bf16 gradients: one rounding
            _close(got_loss, want, 1e-4, f"{impl} loss")
            _close(got_grad, feat.grad, tol, f"{impl} grad")
        # upstream drops ignore pixels with a boolean mask (a host sync): not capturable
        graph = "host syncs (boolean-mask indexing)" if impl == "upstream" else True
        times = kernel_timings(run, dev, graph=graph, **_timing(dev))
        peak = _peak(lambda: run(0), dev)
    except torch.cuda.OutOfMemoryError as exc:  # the upstream N×C×A tensors at N = 204,800
        pytest.skip(f"{impl} runs out of GPU memory at N={n}: {exc}"[:300])
    ms = times.pop("median_ms")
    graph_gbps = moved / (times["graph_ms"] * 1e-3) / 1e9 if times["graph_ms"] else None
    record(bench, impl, dev, shape, ms, bytes_moved=moved, flops=min_flops(bench, n),
           peak_mem_mb=peak, extra={**times, "graph_gbps": round(graph_gbps, 2) if graph_gbps else None,
                                    "loadavg_1m": round(os.getloadavg()[0], 2)})
