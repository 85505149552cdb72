"""DDP on the CPU: 2 processes, gloo backend (torch.multiprocessing, tiny model).

* ClassStats.update with the process group: identical statistics on both ranks, equal to
  one process updating with the concatenated batch.
* Two full SePiCo iterations (train_step with world_size=2, different data per rank):
  student and teacher parameters and class statistics identical on both ranks afterwards.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sepico_fast.contrast import ClassStats

C, A = 19, 16


def _rank_feats(rank):
    g = torch.Generator().manual_seed(100 + rank)
    feat = torch.randn(64, A, generator=g)
    labels = torch.randint(0, 6, (64,), generator=g)
    labels[:5] = 255
    return feat, labels


def _worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # --- statistics alone
        stats = ClassStats(C, A, memory_length=3)
        feat, labels = _rank_feats(rank)
        stats.update(feat, labels, process_group=dist.group.WORLD)
        # --- full iterations
        from sepico_fast.models import build_segmentor
        from sepico_fast.train.config import make_config
        from sepico_fast.train.runner import build_optimizer
        from sepico_fast.train.step import StepContext, train_step
        from sepico_fast.train.uda import make_teacher

        cfg = make_config(dict(crop=[32, 32], iters=4, warmup_iters=1, contrast_start=0, proj_dim=A,
                               variant="dist", seed=7))
        torch.manual_seed(0)
        student = build_segmentor("daformer_tiny", C, A)
        teacher = make_teacher(student)
        ctx = StepContext(cfg=cfg, student=student, teacher=teacher,
                          optimizer=build_optimizer(cfg, student, torch.device("cpu")),
                          stats=ClassStats(C, A), device=torch.device("cpu"), process_group=dist.group.WORLD,
                          world_size=world, rank=rank)
        g = torch.Generator().manual_seed(rank)  # different data on each rank
        for it in range(2):
            src = {"img": torch.randn(1, 3, 32, 32, generator=g), "gt": torch.randint(0, 5, (1, 1, 8, 8), generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)}
            tgt = {"img": torch.randn(1, 3, 32, 48, generator=g)}
            train_step(ctx, src, tgt, it)
        torch.save({"stats": stats.state_dict(), "train_stats": ctx.stats.state_dict(),
                    "student": dict(student.named_parameters()), "teacher": dict(teacher.named_parameters()),
                    "feat": feat, "labels": labels}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_gloo_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # statistics identical on both ranks ...
    for k in r0["stats"]:
        assert torch.equal(r0["stats"][k], r1["stats"][k]), k
    # ... and equal to one process on the concatenated batch
    single = ClassStats(C, A, memory_length=3)
    single.update(torch.cat([r0["feat"], r1["feat"]]), torch.cat([r0["labels"], r1["labels"]]))
    ref = single.state_dict()
    for k in ("mean", "var", "count"):
        torch.testing.assert_close(r0["stats"][k], ref[k], rtol=1e-5, atol=1e-6)
    assert r0["stats"]["count"].sum() == 2 * (64 - 5)
    # full iterations: same student and teacher parameters and statistics everywhere (BN running
    # statistics stay per rank, as DDP with broadcast_buffers=False; rank 0's are saved)
    for part in ("student", "teacher", "train_stats"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k}"
    assert float(r0["train_stats"]["count"].sum()) > 0


def _stall_worker(rank, world, port, out_dir):
    """Rank 1 got a SIGTERM (both ranks must agree to stop), then stalls; rank 0's next
    collective must fail after --ddp-timeout seconds instead of waiting forever."""
    import time

    from sepico_fast.train.ddp import init_distributed
    from sepico_fast.train.faults import StopOnSignal

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = init_distributed("cpu", timeout_s=1)
    try:
        stop = StopOnSignal(info.control_group, info.world_size)
        if rank == 1:
            stop.signum = 15
        agreed = (stop.requested(), stop.signum)
        if rank == 1:
            time.sleep(4)
            return
        t0 = time.perf_counter()
        try:
            dist.barrier()
            outcome = "returned"
        except RuntimeError:
            outcome = "timed out"
        torch.save({"agreed": agreed, "outcome": outcome, "seconds": time.perf_counter() - t0},
                   os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_on_a_free_port(worker, tmp_path) -> None:
    """Two processes of ``worker(rank, world, port, out_dir)`` meeting on a free local TCP port
    (the workers use env:// initialisation, as torchrun does)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_stalled_rank_times_out_and_stop_requests_are_agreed(tmp_path):
    _spawn_on_a_free_port(_stall_worker, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert r0["agreed"] == (True, 15)  # rank 0 got no signal itself
    assert r0["outcome"] == "timed out" and r0["seconds"] < 3.5


def _wait_worker(rank, world, port, out_dir):
    """An agreed SIGTERM stop: rank 0's emergency checkpoint takes a while; rank 1 must not
    return (and exit, which makes torchrun kill rank 0) before it is written."""
    import time
    import types
    from pathlib import Path

    from sepico_fast.train import faults
    from sepico_fast.train.ddp import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = init_distributed("cpu", timeout_s=30)
    marker = Path(out_dir) / "written"
    try:
        def save(run, reason):
            if not run.main:
                return "the checkpoint is written by rank 0", False
            time.sleep(1.5)
            marker.write_text("3")
            return f"emergency checkpoint of iteration 3: {marker}", True

        faults._save = save  # this process only
        run = types.SimpleNamespace(dist_info=info, main=info.is_main, done=3, work_dir=Path(out_dir),
                                    stop=faults.StopOnSignal(info.control_group, info.world_size))
        out = faults.emergency_stop(run, faults.Interrupted(15))
        torch.save({"message": str(out), "code": out.exit_code, "written_when_returned": marker.is_file()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_other_ranks_wait_for_rank0s_emergency_checkpoint(tmp_path):
    _spawn_on_a_free_port(_wait_worker, tmp_path)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert r1["written_when_returned"] and r1["code"] == r0["code"] == 143
    assert r1["message"].startswith("rank 1: stopped by SIGTERM: the checkpoint is written by rank 0")
    assert "emergency checkpoint of iteration 3" in r0["message"]
