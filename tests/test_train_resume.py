"""Exact resume: k + m iterations in one run == k iterations, stop, resume, m iterations.

Runs the real training loop (runner, data loader, checkpoints) on the synthetic pair with
a tiny crop. On the CPU everything is compared bitwise: per-iteration losses, student and
teacher parameters and buffers, the optimizer state and the class statistics. The bitwise
test is pinned to the CPU: on a GPU the step is not bit-reproducible (atomics in the
scatter-adds, cuDNN/cuBLAS algorithm choice, Triton reductions), so the CUDA variant
compares with a stated tolerance instead.
"""
from __future__ import annotations

import json

import pytest
import torch

from sepico_fast.train import make_config
from sepico_fast.train.runner import run

K, M = 3, 3


def _cfg(work_dir, **kw):
    base = dict(iters=K + M, crop=[32, 32], batch_size=1, contrast_start=2, warmup_iters=2, log_interval=1,
                checkpoint_interval=K, debug_interval=0, eval_interval=0, eval_max_images=1, num_workers=0,
                work_dir=str(work_dir), deterministic=True, variant="bank", memory_length=4, proj_dim=16, seed=3,
                device="cpu")
    base.update(kw)
    return make_config(base)


def _losses(work_dir):
    rows = [json.loads(line) for line in (work_dir / "scalars.jsonl").read_text().splitlines()]
    timing = ("images_per_s", "mfu", "tflops_per_s")
    return {r["iter"]: {k: v for k, v in r.items() if k not in timing and not k.startswith("val/")}
            for r in rows if "src_ce" in r}


def _assert_same(a, b, path="ckpt"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture
def one_thread():
    """With 2 intra-op threads some CPU kernels are not bitwise reproducible from one process
    to the next (two identical fresh runs differ by ~1e-7 relative after 3 iterations, resume
    or not); with one thread two runs are bitwise identical, which is what resume must match."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_is_exact(tmp_path, one_thread):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_cfg(straight))
    out = run(_cfg(resumed, stop_at=K))
    assert out == {"stopped_at": K}
    assert (resumed / f"iter_{K:06d}.pt").exists() and not (resumed / "metrics.json").exists()
    run(_cfg(resumed, resume="auto"))

    la, lb = _losses(straight), _losses(resumed)
    assert sorted(la) == list(range(1, K + M + 1)) and sorted(lb) == sorted(la)
    assert la == lb  # bitwise: floats compared exactly
    assert "src_contrast" in la[K + M] and "tgt_contrast" in la[K + M]

    a = torch.load(straight / "latest.pt", weights_only=False)
    b = torch.load(resumed / "latest.pt", weights_only=False)
    assert a["meta"]["iter"] == b["meta"]["iter"] == K + M
    for key in ("state_dict", "optimizer", "class_stats", "counters"):
        _assert_same(a[key], b[key], key)
    assert any(k.startswith("ema_model.") for k in a["state_dict"])
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert ma["miou"] == mb["miou"] and ma["miou_unit"] == "percent"


# Tolerances of the CUDA variant: a resumed GPU run replays the same data and random draws,
# but the order of floating-point reductions may differ, so after M iterations parameters
# agree to float32 rounding amplified by a few Adam steps (whose update size is ~lr
# whatever the gradient size), not bit for bit. Not yet run on a GPU.
CUDA_LOSS_RTOL, CUDA_PARAM_ATOL = 1e-3, 1e-3


def _assert_close(a, b, atol, path="ckpt"):
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=atol, msg=path)
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_close(a[k], b[k], atol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, atol, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_within_tolerance(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_cfg(straight, device="cuda", deterministic=False))
    run(_cfg(resumed, device="cuda", deterministic=False, stop_at=K))
    run(_cfg(resumed, device="cuda", deterministic=False, resume="auto"))
    la, lb = _losses(straight), _losses(resumed)
    assert sorted(la) == sorted(lb) == list(range(1, K + M + 1))
    for it in la:
        assert set(la[it]) == set(lb[it]), it
        for k, v in la[it].items():
            assert lb[it][k] == pytest.approx(v, rel=CUDA_LOSS_RTOL, abs=1e-6), (it, k)
    a = torch.load(straight / "latest.pt", weights_only=False, map_location="cpu")
    b = torch.load(resumed / "latest.pt", weights_only=False, map_location="cpu")
    for key in ("state_dict", "class_stats", "counters"):
        _assert_close(a[key], b[key], CUDA_PARAM_ATOL, key)
