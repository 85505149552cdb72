"""``--ddp-schedule``: with N processes, 'steps' (default) keeps the step counts (N x the
samples), 'samples' divides the step counts by N (the one-GPU number of samples); the run
records which (config.json, metrics.json). Expected values are worked out here."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from sepico_fast.train import make_config
from sepico_fast.train.schedule import ddp_schedule

PAPER = dict(iters=40000, warmup_iters=1500, contrast_start=3000, eval_interval=4000, checkpoint_interval=4000)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_samples_schedule_divides_step_counts(world):
    cfg = make_config(dict(PAPER, ddp_schedule="samples"), preset="daformer_gta2cs")
    run_cfg, record = ddp_schedule(cfg, world)
    assert record["world_size"] == world and record["ddp_schedule"] == "samples"
    assert record["images_per_step"] == 2 * world
    if world == 1:
        assert run_cfg is cfg and record["divided"] == {}
        return
    want = {"iters": math.ceil(40000 / world), "warmup_iters": _round_half_up(1500 / world),
            "contrast_start": _round_half_up(3000 / world), "eval_interval": _round_half_up(4000 / world),
            "checkpoint_interval": _round_half_up(4000 / world)}
    for name, value in want.items():
        assert getattr(run_cfg, name) == value, name
        assert record["divided"][name] == {"requested": PAPER[name], "run": value}
        assert getattr(cfg, name) == PAPER[name]  # the requested config is left alone
    # the run sees at least the one-GPU number of samples, and less than one step more
    samples = run_cfg.iters * run_cfg.batch_size * world
    assert 40000 * 2 <= samples < 40000 * 2 + 2 * world
    assert (run_cfg.lr, run_cfg.batch_size, run_cfg.stop_at, run_cfg.log_interval) == (cfg.lr, 2, 0, cfg.log_interval)
    if world == 8:
        assert (run_cfg.warmup_iters, run_cfg.contrast_start) == (188, 375)  # 187.5 rounds up


def test_steps_schedule_and_zero_counts():
    cfg = make_config(dict(PAPER), preset="daformer_gta2cs")
    assert cfg.ddp_schedule == "steps"
    run_cfg, record = ddp_schedule(cfg, 4)
    assert run_cfg is cfg and record == {"ddp_schedule": "steps", "world_size": 4, "images_per_step": 8, "divided": {}}
    cfg = make_config(dict(iters=7, warmup_iters=0, contrast_start=1, eval_interval=0, checkpoint_interval=3,
                           ddp_schedule="samples"))
    run_cfg, _ = ddp_schedule(cfg, 4)
    assert (run_cfg.iters, run_cfg.warmup_iters, run_cfg.contrast_start, run_cfg.eval_interval,
            run_cfg.checkpoint_interval) == (2, 0, 1, 0, 1)  # 0 stays 0 (off); a count > 0 stays >= 1
    with pytest.raises(ValueError, match="--ddp-schedule"):
        make_config({"ddp_schedule": "epochs"})


def _worker(rank, world, store, work_dir):
    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from sepico_fast.train.runner import run

    cfg = make_config(dict(iters=5, warmup_iters=3, contrast_start=3, eval_interval=0, checkpoint_interval=0,
                           crop=[32, 32], batch_size=1, log_interval=1, debug_interval=0, eval_max_images=1,
                           num_workers=0, proj_dim=16, work_dir=work_dir, ddp_schedule="samples"))
    run(cfg)  # finish() destroys the process group


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_runner_applies_and_records_the_samples_schedule(tmp_path):
    from sepico_fast.data.synthetic import ensure_synthetic

    ensure_synthetic()  # generated once here, not by two processes at the same time
    work_dir = tmp_path / "run"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(work_dir)), nprocs=2, join=True)
    config = json.loads((work_dir / "config.json").read_text())
    # config.json and the checkpoints keep the requested counts (a resume divides them again,
    # once); the schedule record holds what ran: 5/2 rounded up, 1.5 and 1.5 rounded.
    assert (config["iters"], config["warmup_iters"], config["contrast_start"]) == (5, 3, 3)
    assert config["schedule"]["divided"]["iters"] == {"requested": 5, "run": 3}
    assert config["schedule"]["divided"]["warmup_iters"] == {"requested": 3, "run": 2}
    assert config["schedule"]["divided"]["contrast_start"] == {"requested": 3, "run": 2}
    from sepico_fast.train.run_checkpoints import load_checkpoint
    meta = load_checkpoint(work_dir / "latest.pt")["meta"]
    assert meta["config"]["iters"] == 5  # a resume on another world size is refused: meta.world_size
    assert meta["world_size"] == 2 and meta["schedule"]["divided"]["iters"] == {"requested": 5, "run": 3}
    metrics = json.loads((work_dir / "metrics.json").read_text())
    assert metrics["iters"] == 3 and metrics["schedule"]["ddp_schedule"] == "samples"
    assert metrics["schedule"]["world_size"] == 2
    steps = [json.loads(line)["iter"] for line in (work_dir / "scalars.jsonl").read_text().splitlines()
             if "src_ce" in line]
    assert steps == [1, 2, 3]
    assert metrics["dz_test_reweight"]["enabled"] and metrics["dz_test_reweight"]["reweighted_images"] == 0


def test_samples_schedule_stores_the_resolved_crop_and_work_dir(tmp_path, monkeypatch):
    """Under --ddp-schedule samples the run's config is a copy: --crop 0 and the work dir
    were resolved on the copy only, so config.json and every checkpoint stored crop [0, 0]
    (evaluate --sliding then failed) and work_dir ''. One process, the schedule of two."""
    from sepico_fast.data import dataset_defaults
    from sepico_fast.train import runner

    monkeypatch.setattr(runner, "ddp_schedule", lambda cfg, world: ddp_schedule(cfg, 2))
    monkeypatch.chdir(tmp_path)  # the default work dir is relative
    state = runner.setup(make_config(dict(crop=[0], iters=4, ddp_schedule="samples", proj_dim=16)))
    state.writer.close()
    assert state.cfg is not state.requested_cfg and state.cfg.iters == 2
    want = list(dataset_defaults("synthetic", "synthetic")["crop_size"])
    saved = json.loads((state.work_dir / "config.json").read_text())
    assert saved["crop"] == want and saved["work_dir"] == str(state.work_dir) and saved["iters"] == 4
    meta = state.snapshot(0)["meta"]
    assert meta["config"]["crop"] == want and meta["config"]["work_dir"] == str(state.work_dir)


def test_resume_past_the_divided_iterations_stops_in_one_line(tmp_path, monkeypatch):
    """With --resume-override and more processes, --ddp-schedule samples can put the
    checkpoint past the run's last iteration ("3 of 2"): one line, not a silent 'finished'
    run that only re-evaluates. (Four processes simulated by the schedule of four.)"""
    from sepico_fast.train import runner

    base = dict(crop=[32, 32], batch_size=1, proj_dim=16, log_interval=1, debug_interval=0, eval_max_images=1,
                warmup_iters=1, contrast_start=1, ddp_schedule="samples", work_dir=str(tmp_path))
    assert runner.run(make_config(dict(base, iters=8, stop_at=3))) == {"stopped_at": 3}
    monkeypatch.setattr(runner, "ddp_schedule", lambda cfg, world: ddp_schedule(cfg, 4))
    with pytest.raises(SystemExit, match=r"^--resume: .*iter_000003.pt is at iteration 3, past the 2 iterations"):
        runner.setup(make_config({"resume": "auto", "work_dir": str(tmp_path)}))
