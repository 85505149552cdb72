"""Colour jitter (method §6.4): one HSV round trip per op (kornia 0.5.8, the default) vs the
``--fused-jitter`` form (adjacent saturation and hue share one round trip).

    pytest bench/test_bench_augment.py -s        # CPU rows always; CUDA rows need a GPU

Sizes: the synthetic default (2 images 3×128×128) and the paper's crop (2 images 3×512×512).
Order (0, 1, 2, 3) has saturation and hue adjacent, so the fused form saves one round trip
there; 12 of the 24 orders kornia draws have them adjacent, so a training run saves on
about half of its jittered calls. The two forms are timed alternately (A, B, A, B, ...) so a
change in machine load hits both alike. Rows go to bench/results/augment_jitter.json.
"""
import statistics
import time

import pytest
import torch

from bench.record import record
from sepico_fast.augment import color_jitter

SIZES = {"synthetic": (2, 128, 128), "paper": (2, 512, 512)}
ORDER = (0, 1, 2, 3)


def _device_or_skip(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return torch.device(device)


def _time_ms(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return 1e3 * (time.perf_counter() - t0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("size", list(SIZES))
def test_bench_jitter_per_op_vs_fused(device, size):
    dev = _device_or_skip(device)
    b, h, w = SIZES[size]
    g = torch.Generator().manual_seed(0)
    img = torch.rand(b, 3, h, w, generator=g).to(dev)
    u = torch.rand(b, 4, generator=g).to(dev)
    runs = {"per_op": lambda: color_jitter(img, 0.2, factors=u, order=ORDER),
            "fused": lambda: color_jitter(img, 0.2, factors=u, order=ORDER, fused=True)}
    diff = (runs["per_op"]() - runs["fused"]()).abs().max().item()
    assert diff < 2e-5  # the same image up to rounding
    repeats = 30 if dev.type == "cuda" else 15
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(_time_ms(fn, dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    shape = {"B": b, "H": h, "W": w, "order": list(ORDER)}
    for k in runs:
        record("augment_jitter", k, dev, shape, med[k],
               extra={"min_ms": min(times[k]), "repeats": repeats,
                      "per_op_over_fused": med["per_op"] / med["fused"], "max_abs_diff": diff})
    assert all(v > 0 for v in med.values())
