"""Faults during training: the run's own config on resume, a bad validation file
after the checkpoint of the same iteration, a real SIGTERM, weights that do not fit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sepico_fast.data.layouts import Entry
from sepico_fast.train import make_config
from sepico_fast.train.faults import RunStopped
from sepico_fast.train.runner import finish, run, setup, train_loop

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(crop=[32, 32], batch_size=1, proj_dim=16, contrast_start=1, warmup_iters=1, log_interval=1,
            debug_interval=0, eval_max_images=1, num_workers=0)


def _cfg(work_dir, **kw):
    return make_config(dict(TINY, work_dir=str(work_dir), **kw))


def test_resume_auto_continues_the_runs_own_config(tmp_path):
    """The hint printed after --stop-at (--resume auto --work-dir D) continues the 4-iteration
    run, not a default 2000-iteration one; other weights are refused in one line even with
    --resume-override, naming what the checkpoint was trained with."""
    assert run(_cfg(tmp_path, iters=4, stop_at=2, checkpoint_interval=0)) == {"stopped_at": 2}
    bare = make_config({"resume": "auto", "work_dir": str(tmp_path)})
    assert bare.iters == 2000  # what the flags alone would give
    metrics = run(bare)
    assert metrics["iters"] == 4 and json.loads((tmp_path / "config.json").read_text())["iters"] == 4
    rows = [json.loads(x) for x in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "src_ce" in r] == [1, 2, 3, 4]
    other = make_config({"resume": str(tmp_path / "iter_000004.pt"), "work_dir": str(tmp_path / "b"),
                         "arch": "daformer_tiny", "resume_override": True})
    with pytest.raises(SystemExit, match="does not fit this run's model .*arch 'dlv2_tiny'") as exc:
        run(other)
    assert "\n" not in str(exc.value)


def test_bad_validation_file_keeps_the_checkpoint(tmp_path):
    """Evaluation and checkpoint at iteration 2: the checkpoint is written first, the bad
    file is named in one line."""
    state = setup(_cfg(tmp_path, iters=4, eval_interval=2, checkpoint_interval=2))
    bad = tmp_path / "broken_leftImg8bit.png"
    good = state.val_target.entries[0]
    bad.write_bytes(Path(good.image).read_bytes()[:200])  # a truncated PNG: valid header, no pixels
    state.val_target.entries[0] = Entry(bad, good.raw_label, good.label, good.name, good.ref)
    with pytest.raises(RunStopped) as exc:
        try:
            train_loop(state)
        finally:
            state.writer.close()
    msg = str(exc.value)
    assert exc.value.exit_code == 1 and "\n" not in msg and str(bad) in msg
    assert "checkpoint of iteration 2" in msg
    assert torch.load(tmp_path / "iter_000002.pt", weights_only=True)["meta"]["iter"] == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_subprocess_exit_status_and_one_line(tmp_path, sig):
    """A real SIGTERM (``kill``) or SIGINT (Ctrl-C) to ``python -m sepico_fast.train``: exit
    128 + signal (143, 130), the last stderr line says where the checkpoint is, and the
    checkpoint loads with weights_only=True."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "sepico_fast.train", "--crop", "32", "--proj-dim", "16", "--batch-size", "1",
           "--iters", "500", "--log-interval", "1", "--debug-interval", "0", "--work-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        scalars = tmp_path / "scalars.jsonl"
        while not (scalars.is_file() and scalars.read_text().strip()) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    last = err.strip().splitlines()[-1]
    assert f"stopped by {sig.name}" in last and "--resume auto --work-dir" in last and "Traceback" not in err
    path = Path(last.split("checkpoint of iteration ")[1].split(": ", 1)[1].split(";")[0])
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["meta"]["iter"] >= 1 and path.parent == tmp_path


def test_finish_names_a_bad_final_evaluation_file(tmp_path):
    state = setup(_cfg(tmp_path, iters=1))
    train_loop(state)
    good = state.val_target.entries[0]
    bad = tmp_path / "final_leftImg8bit.png"
    bad.write_bytes(b"not an image")
    state.val_target.entries[0] = Entry(bad, good.raw_label, good.label, good.name, good.ref)
    with pytest.raises(RunStopped, match=f"{bad}.*checkpoint .*iter_000001.pt"):
        finish(state)


def test_full_disk_during_training_is_one_line(tmp_path, monkeypatch):
    from sepico_fast.train import run_checkpoints

    monkeypatch.setattr(run_checkpoints, "_open_for_writing", lambda path: open("/dev/full", "wb"))
    with pytest.raises(RunStopped) as exc:
        run(_cfg(tmp_path, iters=2, checkpoint_interval=1))
    msg = str(exc.value)
    assert exc.value.exit_code == 1 and "\n" not in msg and "no space left" in msg
    assert str(tmp_path / "iter_000001.pt") in msg and "bytes" in msg
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_unknown_exception_keeps_its_traceback_after_the_emergency_checkpoint(tmp_path, monkeypatch, capsys):
    from sepico_fast.train import runner

    real_step = runner.train_step

    def step(ctx, src, tgt, it, debug=False):
        if it == 1:
            raise ZeroDivisionError("a bug inside the step")
        return real_step(ctx, src, tgt, it, debug=debug)

    monkeypatch.setattr(runner, "train_step", step)
    with pytest.raises(ZeroDivisionError, match="a bug inside the step"):
        run(_cfg(tmp_path, iters=3, checkpoint_interval=0))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ZeroDivisionError after iteration 1" in err and str(tmp_path / "iter_000001.pt") in err
    meta = torch.load(tmp_path / "iter_000001.pt", weights_only=True)["meta"]
    assert meta["iter"] == 1 and meta["emergency"]["partial_step"] is True


def test_a_signal_during_the_emergency_checkpoint_does_not_cut_it(tmp_path, monkeypatch):
    """SIGTERM in iteration 2, then another SIGTERM while the emergency checkpoint is being
    written (torchrun passing the signal on, or stopping the workers): the checkpoint is
    written all the same and the run ends in the one-line 143 stop, not a KeyboardInterrupt."""
    from sepico_fast.train import faults, run_checkpoints, runner

    monkeypatch.setattr(faults, "DUPLICATE_S", 0.0)  # not a duplicate: only the shield may save it
    real_step, real_save = runner.train_step, run_checkpoints.save_checkpoint

    def step(ctx, src, tgt, it, debug=False):
        if it == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_step(ctx, src, tgt, it, debug=debug)

    def save(*args, **kw):
        signal.raise_signal(signal.SIGTERM)
        return real_save(*args, **kw)

    monkeypatch.setattr(runner, "train_step", step)
    monkeypatch.setattr(run_checkpoints, "save_checkpoint", save)
    state = setup(_cfg(tmp_path, iters=5, checkpoint_interval=0))
    with pytest.raises(RunStopped) as exc:
        try:
            train_loop(state)
        finally:
            state.writer.close()
    assert exc.value.exit_code == 143 and "emergency checkpoint of iteration 3" in str(exc.value)
    assert state.stop.ignored == 1
    assert run_checkpoints.load_checkpoint(tmp_path / "iter_000003.pt")["meta"]["iter"] == 3


def test_second_signal_rules(monkeypatch):
    """The handler alone, on a fake clock: the same request twice within DUPLICATE_S is one
    request; a later one stops at once; once the stop is under way nothing raises."""
    import types

    from sepico_fast.train import faults

    clock = [100.0]
    monkeypatch.setattr(faults, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    stop = faults.StopOnSignal()
    stop._handler(signal.SIGINT, None)
    clock[0] += faults.DUPLICATE_S / 2
    stop._handler(signal.SIGINT, None)  # torchrun forwarding the terminal's Ctrl-C
    assert (stop.signum, stop.ignored, stop.forced) == (signal.SIGINT, 1, False) and stop.requested()
    clock[0] += faults.DUPLICATE_S
    with pytest.raises(KeyboardInterrupt):
        stop._handler(signal.SIGINT, None)
    assert stop.forced
    shielded = faults.StopOnSignal()
    shielded._handler(signal.SIGTERM, None)
    shielded.shield()
    clock[0] += 10 * faults.DUPLICATE_S
    shielded._handler(signal.SIGTERM, None)
    assert shielded.ignored == 1 and not shielded.forced


def test_bad_data_file_and_bad_work_dir_at_setup_are_one_line(tmp_path, monkeypatch):
    """The first target image header is read in setup: a bad file there, and a --work-dir
    that cannot be created, end in one line naming the flag (tracebacks before)."""
    import types

    import sepico_fast.data as data
    from sepico_fast.data.io import DataFileError
    from sepico_fast.train import runner
    from sepico_fast.train.ddp import DistInfo

    bad = "/data/cityscapes/leftImg8bit/train/x_leftImg8bit.png"

    def resized_size(i):
        raise DataFileError(bad, "OSError: cannot identify image file")

    fake = types.SimpleNamespace(resized_size=resized_size)
    monkeypatch.setattr(data, "build_datasets", lambda *a, **k: (fake, fake, fake))
    with pytest.raises(SystemExit) as exc:
        runner._datasets(_cfg(tmp_path))
    msg = str(exc.value)
    assert msg.startswith("--data-root: cannot read " + bad) and "\n" not in msg
    a_file = tmp_path / "afile"
    a_file.write_text("")
    for work_dir in (a_file, a_file / "sub", Path("/proc/x")):
        with pytest.raises(SystemExit) as exc:
            runner._work_dir(_cfg(work_dir), DistInfo())
        assert str(exc.value).startswith(f"--work-dir: cannot create the folder {work_dir} (") and \
            "\n" not in str(exc.value)


def test_resumes_keep_the_training_time_and_set_aside_a_newer_history(tmp_path, monkeypatch, capsys):
    """On a fake clock (1 s per iteration): a finished 4-iteration run resumed again keeps
    train_seconds 4 in metrics.json (it was ~0: only the last process's loop); a resume
    from iteration 2 moves iter_000004.pt aside and its checkpoint at 3 counts 3 s."""
    import types

    from sepico_fast.train import run_checkpoints, runner

    clock = [0.0]
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_step = runner.train_step

    def step(*args, **kw):
        clock[0] += 1.0
        return real_step(*args, **kw)

    monkeypatch.setattr(runner, "train_step", step)
    assert run(_cfg(tmp_path, iters=4, checkpoint_interval=2))["train_seconds"] == 4.0
    again = run(make_config({"resume": "auto", "work_dir": str(tmp_path)}))
    assert again["train_seconds"] == 4.0 and json.loads((tmp_path / "metrics.json").read_text())["train_seconds"] == 4.0
    capsys.readouterr()
    assert run(make_config({"resume": str(tmp_path / "iter_000002.pt"), "stop_at": 3})) == {"stopped_at": 3}
    out = capsys.readouterr().out
    assert "moved iter_000004.pt, latest.pt (past iteration 2" in out and str(tmp_path / "superseded") in out
    assert (tmp_path / "superseded" / "iter_000004.pt").is_file()
    path, ckpt, _ = run_checkpoints.load_newest_intact(tmp_path)
    assert path.name == "iter_000003.pt" and ckpt["counters"]["train_seconds"] == 3.0
    assert ckpt["meta"]["world_size"] == 1 and ckpt["meta"]["schedule"]["ddp_schedule"] == "steps"


def test_resume_from_a_partial_step_checkpoint_warns(tmp_path, capsys):
    from sepico_fast.train.resume import resolve_resume
    from sepico_fast.train.run_checkpoints import atomic_save

    meta = {"iter": 5, "config": _cfg(tmp_path).to_dict(),
            "emergency": {"reason": "ZeroDivisionError: a bug", "partial_step": True}}
    atomic_save({"state_dict": {}, "meta": meta}, tmp_path / "iter_000005.pt")
    resolve_resume(make_config({"resume": "auto", "work_dir": str(tmp_path)}))
    err = capsys.readouterr().err
    assert "warning: --resume:" in err and "taken inside iteration 6 (ZeroDivisionError: a bug)" in err
    assert "not bitwise equal" in err
