"""Self-training pixel ops: upstream Python loops vs batched torch vs the CUDA extension.

Training sizes (method §6): 2 target images 640×1280, 10 crop windows of 640×640, 19 classes;
ClassMix on 2 crops of 3×640×640; pseudo labels from [2,19,640,1280] logits.

    pytest bench/test_bench_ops.py -s          # CPU rows always; CUDA rows need a GPU
                                               # (and the built extension for impl=cuda)

Results are appended to bench/results/ops_*.json by bench/record.py. The upstream rows
include their host syncs (``.item()`` per crop try, ``.cpu()`` per pseudo-label call), which
is the point of the comparison. Times as in bench/test_bench_kernels.py: ``median_ms`` per
call of back-to-back calls, plus ``single_call_ms`` and CUDA-graph ``graph_ms``.
"""
import numpy as np
import pytest
import torch

from bench.record import kernel_timings, record
from sepico_fast import ops
from sepico_fast.ops.upstream import upstream_class_balanced_crop, upstream_classmix, upstream_pseudo_label

B, H, W, CROP, K, C = 2, 640, 1280, 640, 10, 19
IMPLS = ["upstream", "torch", "cuda"]


def _device_or_skip(device: str, impl: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    if impl == "cuda":
        if device != "cuda":
            pytest.skip("the CUDA extension runs on CUDA tensors only")
        if not ops.EXTENSION_AVAILABLE:
            pytest.skip(f"CUDA extension {ops.EXTENSION_STATUS}")
    return torch.device(device)


def _repeats(device: torch.device) -> dict:
    return {"warmup": 3, "repeats": 20} if device.type == "cuda" else {"warmup": 1, "repeats": 3}


def _times(run, dev: torch.device, impl: str) -> tuple[float, dict]:
    """(ms per call of back-to-back calls, the other timings for the record's extra)."""
    graph = "host syncs (upstream's per-sample loop)" if impl == "upstream" else True
    times = kernel_timings(run, dev, graph=graph, **_repeats(dev))
    return times.pop("median_ms"), times


def _pseudo_labels(device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Blocky label maps (regions of 32×32 pixels), like a teacher's arg-max."""
    coarse = torch.randint(0, C, (B, H // 32, W // 32), generator=generator)
    return coarse.repeat_interleave(32, 1).repeat_interleave(32, 2).to(device)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_class_balanced_crop(device, impl):
    dev = _device_or_skip(device, impl)
    g = torch.Generator().manual_seed(0)
    labels = _pseudo_labels(dev, g)
    img = torch.randn(B, 3, H, W, generator=g).to(dev)
    rng = np.random.default_rng(0)

    if impl == "upstream":
        def run(i):
            return upstream_class_balanced_crop(img, labels, (CROP, CROP), rng=rng)[:2]
    else:
        def run(i):
            offsets = ops.sample_crop_offsets(B, K, (H, W), (CROP, CROP), device=dev)
            best = ops.select_crop_windows(labels, offsets, (CROP, CROP), impl=impl)
            return ops.crop_batch(img, best, CROP), ops.crop_batch(labels, best, CROP)

    img_crop, lbl_crop = run(0)
    assert img_crop.shape == (B, 3, CROP, CROP) and lbl_crop.shape == (B, CROP, CROP)
    ms, times = _times(run, dev, impl)
    record("ops_class_balanced_crop", impl, dev, {"B": B, "H": H, "W": W, "crop": CROP, "K": K,
                                                  "C": C}, ms, extra=times)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_classmix(device, impl):
    dev = _device_or_skip(device, impl)
    g = torch.Generator().manual_seed(1)
    src_img = torch.randn(B, 3, CROP, CROP, generator=g).to(dev)
    tgt_img = torch.randn(B, 3, CROP, CROP, generator=g).to(dev)
    src_lbl = _pseudo_labels(dev, g)[:, None, :, :CROP]
    tgt_lbl = _pseudo_labels(dev, g)[:, :, :CROP].contiguous()
    tgt_weight = torch.full((B, CROP, CROP), 0.8, device=dev)
    rng = np.random.default_rng(1)

    if impl == "upstream":
        def run(i):
            return upstream_classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, rng=rng)[:3]
    else:
        def run(i):
            mix = ops.choose_mix_classes(src_lbl)
            return ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix, impl=impl)

    mixed_img, mixed_lbl, mixed_weight = run(0)
    assert mixed_img.shape == src_img.shape and mixed_lbl.shape == (B, 1, CROP, CROP)
    ms, times = _times(run, dev, impl)
    # Least traffic of a fused pass: source label + one image + target label/weight where
    # unmixed (about half) read; image, label and weight written.
    pixels = B * CROP * CROP
    bytes_moved = pixels * (8 + 12 + 0.5 * 12 + 12 + 8 + 4)
    record("ops_classmix", impl, dev, {"B": B, "C": 3, "H": CROP, "W": CROP}, ms,
           bytes_moved=bytes_moved, extra=times)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_pseudo_label(device, impl):
    dev = _device_or_skip(device, impl)
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(B, C, H, W, generator=g)).to(dev)

    if impl == "upstream":
        def run(i):
            return upstream_pseudo_label(logits, 0.968)
    else:
        def run(i):
            return ops.pseudo_label(logits, 0.968, impl=impl)

    prob, label, q = run(0)
    assert prob.shape == label.shape == (B, H, W) and 0.0 <= float(q) <= 1.0
    ms, times = _times(run, dev, impl)
    bytes_moved = logits.numel() * 4 + B * H * W * (4 + 8)
    record("ops_pseudo_label", impl, dev, {"B": B, "C": C, "H": H, "W": W}, ms,
           bytes_moved=bytes_moved, extra=times)
