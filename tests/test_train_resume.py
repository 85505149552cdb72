"""Exact resume: k + m iterations in one run == k iterations, stop, resume, m iterations.

Runs the real training loop (runner, data loader, checkpoints) on the synthetic pair with
a tiny crop. On the CPU everything is compared bitwise: per-iteration losses, student and
teacher parameters and buffers, the optimizer state and the class statistics. The run is
stopped by --stop-at, by a SIGTERM (emergency checkpoint), by a bad data file (emergency
checkpoint, one line naming the file) and by a real SIGKILL of a trainer subprocess (only
the periodic checkpoint survives); each resume must equal the uninterrupted run. The
bitwise tests are pinned to the CPU: on a GPU the step is not bit-reproducible (atomics in
the scatter-adds, cuDNN/cuBLAS algorithm choice, Triton reductions), so the CUDA variant
compares with a stated tolerance instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sepico_fast.data.io import DataFileError
from sepico_fast.data.loader import TrainLoader
from sepico_fast.train import make_config, runner
from sepico_fast.train.faults import RunStopped
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
    timing = ("images_per_s", "mfu", "tflops_per_s", "data_wait")  # wall-clock measurements, not state
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


@contextlib.contextmanager
def _threads(n_new: int):
    n = torch.get_num_threads()
    torch.set_num_threads(n_new)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """With 2 intra-op threads some CPU kernels are not bitwise reproducible from one process
    to the next (two identical fresh runs differ by ~1e-7 relative after 3 iterations, resume
    or not); with one thread two runs are bitwise identical, which is what resume must match."""
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted K + M iterations every resumed run is compared with."""
    work_dir = tmp_path_factory.mktemp("straight")
    with _threads(1):
        run(_cfg(work_dir))
    return work_dir


def _assert_same_run(straight, resumed):
    la, lb = _losses(straight), _losses(resumed)
    assert sorted(la) == list(range(1, K + M + 1)) and sorted(lb) == sorted(la)
    assert la == lb  # bitwise: floats compared exactly
    assert "src_contrast" in la[K + M] and "tgt_contrast" in la[K + M]

    a = torch.load(straight / "latest.pt", weights_only=True)
    b = torch.load(resumed / "latest.pt", weights_only=True)
    assert a["meta"]["iter"] == b["meta"]["iter"] == K + M
    for key in ("state_dict", "optimizer", "class_stats"):
        _assert_same(a[key], b[key], key)
    seconds = (a["counters"].pop("train_seconds"), b["counters"].pop("train_seconds"))  # wall time, not state
    assert min(seconds) > 0
    _assert_same(a["counters"], b["counters"], "counters")
    assert any(k.startswith("ema_model.") for k in a["state_dict"])
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert ma["miou"] == mb["miou"] and ma["miou_unit"] == "percent"


def test_resume_is_exact(straight, tmp_path, one_thread):
    resumed = tmp_path / "resumed"
    out = run(_cfg(resumed, stop_at=K))
    assert out == {"stopped_at": K}
    assert (resumed / f"iter_{K:06d}.pt").exists() and not (resumed / "metrics.json").exists()
    run(_cfg(resumed, resume="auto"))
    _assert_same_run(straight, resumed)


def test_sigterm_writes_a_checkpoint_and_resume_is_exact(straight, tmp_path, one_thread, monkeypatch):
    """SIGTERM during iteration 2 (of 6; checkpoints every 3): iteration 2 finishes, an
    emergency checkpoint of it is written, exit status 143; resuming continues exactly."""
    resumed = tmp_path / "resumed"
    real_step = runner.train_step

    def step_then_signal(ctx, src, tgt, it, debug=False):
        out = real_step(ctx, src, tgt, it, debug=debug)
        if it == 1:
            signal.raise_signal(signal.SIGTERM)  # the handler only sets a flag
        return out

    monkeypatch.setattr(runner, "train_step", step_then_signal)
    with pytest.raises(RunStopped) as exc:
        run(_cfg(resumed))
    assert exc.value.exit_code == 143 and "\n" not in str(exc.value)
    assert "SIGTERM" in str(exc.value) and str(resumed / "iter_000002.pt") in str(exc.value)
    ckpt = torch.load(resumed / "iter_000002.pt", weights_only=True)
    assert ckpt["meta"]["iter"] == 2 and ckpt["meta"]["emergency"]["partial_step"] is False
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(runner, "train_step", real_step)
    run(_cfg(resumed, resume="auto"))
    _assert_same_run(straight, resumed)


def test_bad_training_file_writes_a_checkpoint_and_names_the_file(straight, tmp_path, one_thread, monkeypatch):
    """A file that fails to decode when the batch of iteration 4 is loaded: one line naming
    it, an emergency checkpoint of the 4 completed iterations, and an exact resume."""
    resumed = tmp_path / "resumed"
    real_iter = TrainLoader._iterate_torch

    def failing(self):
        for t, batch in enumerate(real_iter(self), start=self.start_iter):
            if t == 4:
                raise DataFileError("/data/gta/images/01234.png", "OSError: image file is truncated")
            yield batch

    monkeypatch.setattr(TrainLoader, "_iterate_torch", failing)
    with pytest.raises(RunStopped) as exc:
        run(_cfg(resumed))
    msg = str(exc.value)
    assert exc.value.exit_code == 1 and "\n" not in msg
    assert "/data/gta/images/01234.png" in msg and str(resumed / "iter_000004.pt") in msg
    monkeypatch.setattr(TrainLoader, "_iterate_torch", real_iter)
    run(_cfg(resumed, resume="auto"))
    _assert_same_run(straight, resumed)


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
    for ckpt in (a, b):
        ckpt["counters"].pop("train_seconds")  # wall time, not state
    for key in ("state_dict", "class_stats", "counters"):
        _assert_close(a[key], b[key], CUDA_PARAM_ATOL, key)


_SLOW_AFTER_CHECKPOINT = """
import os, sys, time
from pathlib import Path
from sepico_fast.train import runner
real_step = runner.train_step

def step(ctx, src, tgt, it, debug=False):
    if it == {k}:  # the checkpoint of iteration {k} is written: tell the parent, wait for kill -9
        Path(os.environ["KILL_ME_MARKER"]).touch()
        time.sleep(120)
    return real_step(ctx, src, tgt, it, debug=debug)

runner.train_step = step
from sepico_fast.train.__main__ import main
main(sys.argv[1:])
"""


def _cli_flags(work_dir):
    """The command line of ``_cfg(work_dir)``."""
    return ["--iters", str(K + M), "--crop", "32", "32", "--batch-size", "1", "--contrast-start", "2",
            "--warmup-iters", "2", "--log-interval", "1", "--checkpoint-interval", str(K), "--debug-interval", "0",
            "--eval-interval", "0", "--eval-max-images", "1", "--num-workers", "0", "--work-dir", str(work_dir),
            "--deterministic", "--variant", "bank", "--memory-length", "4", "--proj-dim", "16", "--seed", "3",
            "--device", "cpu"]


def test_kill_9_then_resume_auto_is_exact(straight, tmp_path):
    """A real SIGKILL (no handler, no emergency checkpoint) of ``python -m sepico_fast.train``
    in iteration K + 1, after the periodic checkpoint of iteration K; ``--resume auto`` in a
    new process continues from it and ends bitwise equal to the uninterrupted run."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",  # one thread, as the straight run (see one_thread)
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    resumed, marker = tmp_path / "resumed", tmp_path / "in_iteration_k"
    env["KILL_ME_MARKER"] = str(marker)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_AFTER_CHECKPOINT.format(k=K), *_cli_flags(resumed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not marker.exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        assert marker.exists() and (resumed / f"iter_{K:06d}.pt").exists(), "not in iteration K within 240 s"
        proc.kill()  # SIGKILL
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err
    assert not (resumed / f"iter_{K + 1:06d}.pt").exists() and not (resumed / "metrics.json").exists()
    out = subprocess.run([sys.executable, "-m", "sepico_fast.train", *_cli_flags(resumed), "--resume", "auto"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_run(straight, resumed)
