"""SePiCo on a DINOv2 ViT-B/14 (``dinov2_vitb14``) at the preset crop: FLOPs, and ms/iter + MFU on a GPU.

* ``test_bench_vit_flops`` (any machine): forward and backward FLOPs of one training image
  (640 x 640, the ``dinov2b_gta2cs`` crop, padded to 644 inside) counted with
  ``FlopCounterMode`` on the meta device (models/flops.py: matmuls, convolutions and
  attention; 1 multiply-add = 2 FLOPs), and the FLOPs of one whole SePiCo iteration
  (train/throughput.py: every teacher and student pass, batch 2 + 2, target 640 x 1280).
* ``test_bench_vit_train_step_cuda`` (CUDA only, skipped otherwise): ``train_step`` in bf16
  autocast, eager, batch 2 + 2, after the contrast start (DistCL + regulariser), random
  weights (``bench/step_harness.py``, fresh process, median of 5 iterations after 2
  warm-up ones), then MFU = iteration FLOPs / time / the GPU's dense bf16 peak.

    pytest bench/test_bench_vit.py -s            # --record appends the rows to bench/results/vit_step.json

No timing is asserted: only that every number came back finite and positive.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.record import record
from bench.step_harness import bench_config, subprocess_run

ARCH, CROP, BATCH = "dinov2_vitb14", 640, 2


def _fwd_bwd_flops(arch: str, size: int) -> dict[str, int]:
    """Forward (logits + projection) and backward FLOPs of one training image, on meta tensors.

    torch's counter prices the backward of a grouped (depthwise) convolution as a dense one
    (64x too much for a 64-channel depthwise 3x3: the DAFormer head's sep-ASPP), so the
    backward of every convolution is taken as 2x its forward (input + weight gradients; the
    patch embedding's input is the image, which needs no gradient: 1x) and the counter is
    used for the rest (matmuls, attention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from sepico_fast.models import build_segmentor

    with torch.device("meta"):
        model = build_segmentor(arch, 19, 512).train()
        img = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as fwd:
        logits, proj = model(img)
        loss = logits.float().sum() + proj.float().sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    conv_fwd = sum(n for op, n in fwd.get_flop_counts()["Global"].items() if "convolution" in str(op))
    bwd_rest = sum(n for op, n in bwd.get_flop_counts()["Global"].items() if "convolution" not in str(op))
    cfg = model.backbone.config
    grid = -(-size // cfg.patch_size)
    patch_fwd = 2 * 3 * cfg.patch_size ** 2 * cfg.dim * grid * grid
    return {"forward": fwd.get_total_flops(), "backward": bwd_rest + 2 * conv_fwd - patch_fwd,
            "backward_torch_counter": bwd.get_total_flops()}


def test_bench_vit_flops():
    from sepico_fast.models.flops import model_cost
    from sepico_fast.train.throughput import flops_per_iteration

    counts = _fwd_bwd_flops(ARCH, CROP)
    cost = model_cost(ARCH, CROP, CROP, proj_dim=512)
    assert counts["forward"] == cost.flops_train_forward > 0
    # backward ~ 2x forward (input and weight gradients); the input image needs no gradient
    assert 1.9 < counts["backward"] / counts["forward"] < 2.0
    it = flops_per_iteration(bench_config(ARCH, CROP, BATCH), (CROP, 2 * CROP))
    assert it is not None and it.after_contrast > it.before_contrast > 0
    print(f"\n[vit flops] {ARCH} at {CROP}x{CROP}, one image: forward {counts['forward'] / 1e9:.1f} GFLOP "
          f"(backbone {cost.flops_backbone / 1e9:.1f}, decode {cost.flops_decode / 1e9:.1f}, "
          f"proj {cost.flops_proj / 1e9:.1f}), backward {counts['backward'] / 1e9:.1f} GFLOP "
          f"(torch's counter: {counts['backward_torch_counter'] / 1e9:.1f}, grouped convolutions priced dense); "
          f"one SePiCo iteration (batch {BATCH}+{BATCH}, target {CROP}x{2 * CROP}): "
          f"{it.after_contrast / 1e12:.2f} TFLOP ({it.before_contrast / 1e12:.2f} before the contrast start)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: ms/iter and MFU not measured")
def test_bench_vit_train_step_cuda():
    from sepico_fast.train.throughput import device_peak_tflops, flops_per_iteration, mfu

    res = subprocess_run(ARCH, CROP, BATCH, dataflow="fast", device="cuda", precision="bf16")
    ms = res["fast"]["median_ms"]
    assert ms is not None and math.isfinite(ms) and ms > 0, res
    flops = flops_per_iteration(bench_config(ARCH, CROP, BATCH), (CROP, 2 * CROP)).after_contrast
    peak = device_peak_tflops(torch.device("cuda"))
    util = mfu(flops, ms * 1e-3, peak)
    shape = {"arch": ARCH, "crop": CROP, "batch": BATCH, "precision": "bf16", "mode": "eager"}
    record("vit_step", "fast_eager", "cuda", shape, ms, flops=flops,
           extra={"images_per_s": round(2 * BATCH / (ms * 1e-3), 3), "times_ms": res["fast"]["times_ms"],
                  "warmup_ms": res["fast"]["warmup_ms"], "peak_tflops": peak,
                  "mfu": round(util, 4) if util is not None else None})
    print(f"[vit step] {ARCH} bf16 crop {CROP} batch {BATCH}+{BATCH}: {ms:.0f} ms/iter, "
          f"{flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s" + (f", MFU {100 * util:.1f}%" if util is not None else
                                                         " (peak of this GPU unknown: no MFU)"))
