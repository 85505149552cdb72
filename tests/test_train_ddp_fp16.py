"""fp16 + GradScaler under DDP (2 CPU processes, gloo): the skipped-step counter agrees.

Rank 1 gets a NaN pixel in its source image at iteration 1. Its losses are NaN, the
all-reduced gradients are NaN on both ranks and both skip the optimizer step; the counter
behind ``--max-skipped-steps`` must then read 1 on BOTH ranks (counting only local losses,
rank 0 would read 0 and keep training while rank 1 stops, leaving rank 0 waiting in the
next collective).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

C, A = 19, 16


def _worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from sepico_fast.contrast import ClassStats
        from sepico_fast.models import build_segmentor
        from sepico_fast.train.config import make_config
        from sepico_fast.train.runner import build_optimizer
        from sepico_fast.train.step import StepContext, train_step
        from sepico_fast.train.uda import make_teacher

        cfg = make_config(dict(crop=[32, 32], iters=4, warmup_iters=1, contrast_start=0, proj_dim=A,
                               variant="dist", seed=7))
        torch.manual_seed(0)
        student = build_segmentor("daformer_tiny", C, A)
        ctx = StepContext(cfg=cfg, student=student, teacher=make_teacher(student),
                          optimizer=build_optimizer(cfg, student, torch.device("cpu")),
                          stats=ClassStats(C, A), device=torch.device("cpu"), amp_dtype=torch.float16,
                          scaler=torch.amp.GradScaler("cpu"), process_group=dist.group.WORLD,
                          world_size=world, rank=rank)
        g = torch.Generator().manual_seed(rank)
        skipped, src_ce = [], []
        for it in range(3):
            gt = torch.randint(0, 5, (1, 1, 8, 8), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
            src = {"img": torch.randn(1, 3, 32, 32, generator=g), "gt": gt}
            if rank == 1 and it == 1:
                src["img"][0, :, 5, 5] = float("nan")
            out = train_step(ctx, src, {"img": torch.randn(1, 3, 32, 48, generator=g)}, it)
            skipped.append(float(ctx.skipped))
            src_ce.append(float(out["losses"]["src_ce"]))
        torch.save({"skipped": skipped, "src_ce": src_ce,
                    "student": {k: v.detach() for k, v in student.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fp16_skipped_steps_agree_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r1["skipped"] == [0.0, 1.0, 1.0]      # the NaN rank counts its bad step ...
    assert r0["skipped"] == r1["skipped"]        # ... and so does the healthy rank
    assert not math.isfinite(r1["src_ce"][1])     # the NaN pixel really made rank 1's loss NaN
    for r in (r0, r1):                            # training went on with finite losses afterwards
        assert math.isfinite(r["src_ce"][0]) and math.isfinite(r["src_ce"][2]), r["src_ce"]
    for k in r0["student"]:                       # and the ranks stayed in lock-step
        assert torch.equal(r0["student"][k], r1["student"][k]), k
