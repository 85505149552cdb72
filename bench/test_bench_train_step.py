"""One full SePiCo training iteration (train_step, after contrast_start), tiny model.

Rows: device × precision × crop, daformer_tiny, batch 2 (+2 target images at 1×2 crop
area), DistCL. On the CPU the fp32 vs bf16-autocast rows are what decides the default of
``--amp`` there (see docs/training.md). ``extra.images_per_s`` counts source + target
images. Results: ``bench/results/train_step.json``.
"""
from __future__ import annotations

import pytest
import torch

from bench.record import median_time_ms, peak_memory_mb, record
from sepico_fast.contrast import ClassStats
from sepico_fast.models import build_segmentor
from sepico_fast.train.config import make_config
from sepico_fast.train.runner import build_optimizer
from sepico_fast.train.throughput import flops_per_iteration
from sepico_fast.train.step import StepContext, train_step
from sepico_fast.train.uda import make_teacher

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: GPU rows not measured"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("crop", [64, 128])
def test_bench_train_step(device, precision, crop):
    dev = torch.device(device)
    cfg = make_config(dict(crop=[crop, crop], iters=1000, contrast_start=0, warmup_iters=0, proj_dim=64))
    torch.manual_seed(0)
    student = build_segmentor(cfg.arch, 19, cfg.proj_dim).to(dev)
    ctx = StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                      optimizer=build_optimizer(cfg, student, dev), stats=ClassStats(19, cfg.proj_dim, device=dev),
                      device=dev, amp_dtype=torch.bfloat16 if precision == "bf16" else None)
    g = torch.Generator().manual_seed(0)
    lbl = torch.randint(0, 19, (2, 1, crop // 8, crop // 8), generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3)
    src = {"img": torch.randn(2, 3, crop, crop, generator=g).to(dev), "gt": lbl.to(dev)}
    tgt = {"img": torch.randn(2, 3, crop, 2 * crop, generator=g).to(dev)}
    ms = median_time_ms(lambda i: train_step(ctx, src, tgt, i + 1), dev, warmup=2, repeats=5)
    flops = flops_per_iteration(cfg, (crop, 2 * crop)).at(cfg.contrast_start)  # after contrast start
    record("train_step", f"{precision}", dev, {"arch": cfg.arch, "batch": 2, "crop": crop}, ms, flops=flops,
           peak_mem_mb=peak_memory_mb(lambda: train_step(ctx, src, tgt, 100), dev),
           extra={"images_per_s": round(4 / (ms * 1e-3), 2)})
    assert ms > 0
