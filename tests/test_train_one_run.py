"""One run, one folder: the work dir's lock (two trainers, a resume of a live run, a holder
killed with SIGKILL), a new run refused in another run's folder (``--overwrite`` moves the
old files aside), unique default names, retention of the run's own checkpoints only,
checkpoints of a newer format refused by every reader, and the messages around a stop
(--stop-at, a failed emergency checkpoint, paths with spaces, scalars.jsonl after a kill)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from sepico_fast.train import faults, make_config, run_checkpoints, workdir
from sepico_fast.train.runner import finish, run, setup, train_loop

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(crop=[32, 32], batch_size=1, proj_dim=16, contrast_start=1, warmup_iters=1, log_interval=1,
            debug_interval=0, eval_max_images=1, num_workers=0)
TINY_ARGS = ["--crop", "32", "--proj-dim", "16", "--batch-size", "1", "--contrast-start", "1", "--warmup-iters", "1",
             "--log-interval", "1", "--debug-interval", "0", "--eval-max-images", "1"]


def _cfg(work_dir, **kw):
    return make_config(dict(TINY, work_dir=str(work_dir), **kw))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _loss_iters(work_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (work_dir / "scalars.jsonl").read_text().splitlines()]
    return [r["iter"] for r in rows if "src_ce" in r]


def _meta(path: Path) -> dict:
    return torch.load(path, weights_only=True)["meta"]


def test_two_trainers_on_one_folder(tmp_path):
    """While a run trains (here: set up in this process, holding the lock), a second trainer
    on its folder and a --resume of it each stop with one line naming the holder and touch
    nothing; the first then finishes intact."""
    d = tmp_path / "my runs" / "a b"
    assert run(_cfg(d, iters=4, stop_at=2, checkpoint_interval=1)) == {"stopped_at": 2}
    run_id = _meta(d / "iter_000002.pt")["run_id"]
    first = setup(make_config({"resume": "auto", "work_dir": str(d)}))  # resumed at 2, lock held
    holder = json.loads((d / workdir.LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["run_id"] == run_id
    before = sorted(p.name for p in d.iterdir())
    tries = [(["--seed", "1", *TINY_ARGS, "--iters", "4"], "--work-dir: "),
             (["--resume", "auto"], "--resume: the run in ")]
    procs = [subprocess.Popen([sys.executable, "-m", "sepico_fast.train", "--work-dir", str(d), *args], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, _ in tries]
    for proc, (_, opener) in zip(procs, tries):  # started together: the same second, the same folder
        _, err = proc.communicate(timeout=240)
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, err
        assert lines[0].startswith(opener) and f"pid {os.getpid()} " in lines[0] and run_id in lines[0], lines
    assert sorted(p.name for p in d.iterdir()) == before and not (d / "superseded").exists()
    train_loop(first)
    metrics = finish(first)
    assert metrics["iters"] == 4 and json.loads((d / "config.json").read_text())["seed"] == 0
    assert _loss_iters(d) == [1, 2, 3, 4]
    assert _meta(d / "iter_000004.pt")["run_id"] == run_id
    # released at the end: the folder can be resumed (a finished run: nothing left to train)
    lock = workdir.RunLock.acquire(d, "x")
    lock.release()


def test_killed_holder_leaves_no_lock_and_no_repeated_rows(tmp_path):
    """kill -9 of a trainer: its lock goes with it (the OS releases it), the resume takes the
    folder, and scalars.jsonl holds every iteration once (rows past the checkpoint are moved
    to superseded/)."""
    d = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sepico_fast.train", *TINY_ARGS, "--iters", "500",
                             "--checkpoint-interval", "3", "--work-dir", str(d)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            ckpts = run_checkpoints.iteration_files(d)
            if ckpts and (d / "scalars.jsonl").is_file():
                newest = int(run_checkpoints.CKPT_RE.match(ckpts[0].name).group(1))
                if max(_loss_iters(d) or [0]) > newest:
                    break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((d / workdir.LOCK_NAME).read_text())["pid"] == proc.pid  # the file stays, unlocked
    path, ckpt, _ = run_checkpoints.load_newest_intact(d)
    k = int(ckpt["meta"]["iter"])
    logged = _loss_iters(d)
    assert max(logged) > k  # the kill left rows past the checkpoint
    assert run(make_config({"resume": "auto", "work_dir": str(d), "stop_at": k + 2})) == {"stopped_at": k + 2}
    assert _loss_iters(d) == list(range(1, k + 3))
    aside = [json.loads(x)["iter"] for x in (d / "superseded" / "scalars.jsonl").read_text().splitlines()]
    assert aside and min(aside) == k + 1


def test_new_run_in_another_runs_folder(tmp_path):
    """Refused in one line (resume it, a new --work-dir, or --overwrite); --overwrite moves the
    old run's files into overwritten_<time>/ and deletes nothing."""
    d = tmp_path / "w"
    run(_cfg(d, iters=2, checkpoint_interval=1))
    with pytest.raises(SystemExit) as exc:
        run(_cfg(d, iters=2, seed=1))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"--work-dir: {d} holds another run (iter_000002.pt")
    assert "--resume auto --work-dir" in msg and "--overwrite" in msg
    assert _meta(d / "iter_000002.pt")["config"]["seed"] == 0 and not list(d.glob("overwritten_*"))
    run(_cfg(d, iters=2, seed=1, checkpoint_interval=1, overwrite=True))
    aside, = d.glob("overwritten_*")
    assert _meta(aside / "iter_000002.pt")["config"]["seed"] == 0 and (aside / "metrics.json").is_file()
    assert json.loads((aside / "config.json").read_text())["seed"] == 0
    assert _meta(d / "iter_000002.pt")["config"]["seed"] == 1 and _loss_iters(d) == [1, 2]
    assert (d / "iter_000001.pt").is_file()  # the new run's own retention (keep 2) after the move


def test_default_folders_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir, "utc_stamp", lambda micro=False: "20260101_000000")
    cfg = make_config({})
    made = [workdir.default_work_dir(cfg, root=tmp_path) for _ in range(40)]
    assert len(set(made)) == 40 and all(p.is_dir() for p in made)
    assert made[0].name.startswith("synthetic_sepico_dist_s0_20260101_000000_")


def test_retention_only_deletes_this_runs_checkpoints(tmp_path):
    def state(it, run_id):
        return {"state_dict": {}, "meta": {"iter": it, "run_id": run_id}}

    for it in (100, 200):
        run_checkpoints.save_checkpoint(tmp_path, state(it, "other"), it, keep=2)
    for it in (1, 2, 3):
        run_checkpoints.save_checkpoint(tmp_path, state(it, "mine"), it, keep=2)
    names = sorted(p.name for p in run_checkpoints.iteration_files(tmp_path))
    assert names == ["iter_000002.pt", "iter_000003.pt", "iter_000100.pt", "iter_000200.pt"]
    assert run_checkpoints.run_id_of(tmp_path / "latest.pt") == "mine"


def _rewritten(src: Path, dest: Path, change) -> Path:
    ckpt = torch.load(src, weights_only=True)
    change(ckpt["meta"])
    run_checkpoints.atomic_save(ckpt, dest)
    return dest


@pytest.mark.parametrize("what", ["format", "field"])
def test_checkpoint_of_a_newer_format_is_refused_everywhere(tmp_path, what):
    from sepico_fast import evaluate, export
    from sepico_fast.checkpoint import load_pretrained
    from sepico_fast.models import build_segmentor

    run(_cfg(tmp_path / "old", iters=1))
    change = ((lambda m: m.update(format="sepico_fast/3")) if what == "format" else
              (lambda m: m["config"].update(future_flag=1)))
    newer = _rewritten(tmp_path / "old" / "iter_000001.pt", tmp_path / "new" / "iter_000001.pt", change)
    reason = "sepico_fast/3" if what == "format" else "future_flag"
    for cfg, opener in ((make_config({"resume": str(newer), "work_dir": str(tmp_path / "r")}), "--resume: "),
                        (make_config({"resume": "auto", "work_dir": str(newer.parent)}), "--resume auto: ")):
        with pytest.raises(SystemExit) as exc:
            run(cfg)
        msg = str(exc.value)
        assert msg.startswith(opener + str(newer)) and reason in msg and "newer sepico_fast" in msg, msg
        assert "\n" not in msg
    for main, args in ((evaluate.main, []), (export.main, ["--format", "torchscript"])):
        with pytest.raises(SystemExit) as exc:
            main(["--checkpoint", str(newer), *args])
        msg = str(exc.value)
        assert msg.startswith("--checkpoint: ") and reason in msg and "\n" not in msg, msg
    with pytest.raises(SystemExit) as exc:
        load_pretrained(build_segmentor("dlv2_tiny", 19, 16), newer, verbose=False)
    assert str(exc.value).startswith("--pretrained: ") and reason in str(exc.value)
    assert not (tmp_path / "r").exists() and not (tmp_path / "new" / "config.json").exists()


def test_stop_at_not_past_the_checkpoint_and_quoted_resume_hint(tmp_path, capsys):
    d = tmp_path / "runs with spaces" / "it's"
    assert run(_cfg(d, iters=4, stop_at=2, checkpoint_interval=0)) == {"stopped_at": 2}
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith("stopped after iteration 2 (--stop-at); resume with --resume auto --work-dir ")
    assert shlex.split(hint.split("resume with ")[1]) == ["--resume", "auto", "--work-dir", str(d)]
    for stop_at in (1, 2):
        with pytest.raises(SystemExit) as exc:
            run(make_config({"resume": "auto", "work_dir": str(d), "stop_at": stop_at}))
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and err.count("\n") == 1 and "--stop-at" in err and "stopped after" not in out


def _fake_run(work_dir: Path, saved_at):
    return types.SimpleNamespace(stop=None, work_dir=work_dir, done=5, start_it=0, saved_at=saved_at, main=True,
                                 in_step=False, cfg=types.SimpleNamespace(keep_checkpoints=2),
                                 snapshot=lambda done, **meta: {},
                                 dist_info=types.SimpleNamespace(world_size=1, rank=0))


def test_failed_emergency_checkpoint_does_not_say_resume(tmp_path, monkeypatch):
    d = tmp_path / "a b"

    def full_disk(*a, **k):
        raise run_checkpoints.CheckpointWriteError("cannot write checkpoint: no space left")

    monkeypatch.setattr(run_checkpoints, "save_checkpoint", full_disk)
    for saved_at, last in ((3, f"the newest checkpoint is of iteration 3 in {shlex.quote(str(d))}"),
                           (None, "no checkpoint of this run was written")):
        out = faults.emergency_stop(_fake_run(d, saved_at), faults.Interrupted(signal.SIGTERM))
        msg = str(out)
        assert isinstance(out, faults.RunStopped) and "\n" not in msg
        assert "emergency checkpoint failed too" in msg and "resume" not in msg and last in msg, msg
    monkeypatch.setattr(run_checkpoints, "save_checkpoint", lambda *a, **k: d / "iter_000005.pt")
    msg = str(faults.emergency_stop(_fake_run(d, 3), faults.Interrupted(signal.SIGTERM)))
    assert shlex.split(msg.split("resume with ")[1]) == ["--resume", "auto", "--work-dir", str(d)]
