"""Bad values, diverged checkpoints and read-only places at the command lines: ``evaluate``,
``export`` and the trainer stop with one line naming the flag (evaluate and export: exit
status 2), never a traceback, a silent NaN result or an ignored value."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sepico_fast import evaluate, export
from sepico_fast.models import build_segmentor
from sepico_fast.train import make_config
from sepico_fast.train.run_checkpoints import atomic_save, prefixed

ROOT = Path(__file__).resolve().parents[1]


def _cli(module: str, *args) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", f"sepico_fast.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, lines[0]


def _checkpoint(path: Path, nan_key: str | None = None) -> Path:
    cfg = make_config({"arch": "dlv2_tiny", "proj_dim": 16, "crop": [64, 64]})
    sd = build_segmentor("dlv2_tiny", 19, 16).state_dict()
    if nan_key is not None:
        sd[nan_key].view(-1)[:3] = float("nan")
    return atomic_save({"state_dict": prefixed("model.", sd), "meta": {"iter": 0, "config": cfg.to_dict()}}, path)


def _deny_writes(monkeypatch, folder: Path) -> None:
    """Writes under ``folder`` fail as on a read-only file system (as root, chmod denies nothing)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


# ----------------------------------------------------------------------------- non-finite weights

def test_nan_weights_refused_by_evaluate_and_export(tmp_path):
    key = next(k for k, v in build_segmentor("dlv2_tiny", 19, 16).state_dict().items() if v.is_floating_point())
    ckpt = _checkpoint(tmp_path / "diverged.pt", key)
    code, line = _cli("evaluate", "--checkpoint", ckpt, "--max-images", "1")
    assert code == 2 and line.startswith(f"--checkpoint: {ckpt}: tensor model.{key} holds 3 NaN/Inf value(s)")
    with pytest.raises(SystemExit, match=f"^--checkpoint: .*tensor model.{key} holds 3 NaN"):
        export.main(["--checkpoint", str(ckpt), "--format", "torchscript"])
    assert not list(tmp_path.glob("diverged.ts.pt"))
    assert evaluate.non_finite_tensor(build_segmentor("dlv2_tiny", 19, 16)) is None


# ----------------------------------------------------------------------------- bad values

def test_bad_max_images_crop_and_opset_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "ok.pt")
    with pytest.raises(SystemExit, match=r"^--max-images: expected 0 \(all images\) or a positive count, got -1"):
        evaluate.main(["--checkpoint", str(ckpt), "--max-images", "-1"])
    for crop in (["7"], ["64", "7"], ["64", "64", "64"]):
        with pytest.raises(SystemExit, match="^--crop: expected H W .*at least 32 pixels"):
            evaluate.main(["--checkpoint", str(ckpt), "--sliding", "--crop", *crop])
    code, line = _cli("export", "--checkpoint", ckpt, "--format", "onnx", "--opset", "1")
    assert code == 2 and line.startswith("--opset: expected 18..") and "got 1" in line
    for extra, why in ((["--onnx-exporter", "legacy", "--opset", "9"], "expected 11..20 with --onnx-exporter legacy"),
                       (["--opset", "99"], "expected 18.."),
                       (["--format", "torchscript", "--opset", "18"], "only for --format onnx")):
        fmt = [] if "--format" in extra else ["--format", "onnx"]
        with pytest.raises(SystemExit, match=f"^--opset: {why}"):
            export.main(["--checkpoint", str(ckpt), *fmt, *extra])
    assert not list(tmp_path.glob("*.onnx"))


def test_export_writes_the_requested_opset(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx (export extra) is not installed")
    ckpt = _checkpoint(tmp_path / "ok.pt")
    out = export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--onnx-exporter", "legacy", "--opset", "13",
                       "--size", "64", "64", "--no-check"])
    written = [o.version for o in onnx.load(out["out"]).opset_import if o.domain in ("", "ai.onnx")]
    assert written == [13]


# ----------------------------------------------------------------------------- read-only places

def test_evaluate_out_and_export_next_to_a_read_only_checkpoint(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "run" / "latest.pt")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, line = _cli("evaluate", "--checkpoint", ckpt, "--out", blocker / "pred", "--max-images", "1")
    assert code == 2 and line.startswith(f"--out: cannot write in {blocker / 'pred'} (Not a directory)")
    with pytest.raises(SystemExit, match=r"^--out: cannot write in .*a_file \(a file, not a folder\)"):
        export.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(blocker / "m.ts.pt")])
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny_writes(monkeypatch, ro)
    with pytest.raises(SystemExit, match=r"^--out: cannot write in .*ro \(Read-only file system\)"):
        evaluate.main(["--checkpoint", str(ckpt), "--out", str(ro), "--max-images", "1"])
    _deny_writes(monkeypatch, tmp_path / "run")
    with pytest.raises(SystemExit, match=r"^--out: cannot write in .*run \(Read-only file system\) \(the default, "
                                         "next to the checkpoint\\); pass --out FILE"):
        export.main(["--checkpoint", str(ckpt), "--format", "torchscript"])


TINY = dict(crop=[32, 32], batch_size=1, proj_dim=16, contrast_start=1, warmup_iters=1, log_interval=1,
            debug_interval=0, eval_max_images=1, num_workers=0, iters=1, checkpoint_interval=1)


def test_trainer_resume_in_a_read_only_work_dir_and_dali_missing(tmp_path, monkeypatch):
    from sepico_fast.data import loader
    from sepico_fast.train.runner import run

    work = tmp_path / "run"  # a run folder (what is in it does not matter: nothing is read before the check)
    work.mkdir()
    (work / "config.json").write_text("{}")
    before = sorted(p.name for p in work.iterdir())
    with monkeypatch.context() as m:
        _deny_writes(m, work)
        with pytest.raises(SystemExit, match=r"^--work-dir: cannot write in .*run \(Read-only file system\); a "
                                             "resumed run writes its checkpoints there: copy the run folder") as exc:
            run(make_config({"resume": "auto", "work_dir": str(work)}))
    assert "\n" not in str(exc.value) and sorted(p.name for p in work.iterdir()) == before

    monkeypatch.setattr(loader, "dali_available", lambda: False)
    with pytest.raises(SystemExit, match="^--pipeline: dali requested but nvidia.dali does not import"):
        run(make_config(dict(TINY, work_dir=str(tmp_path / "dali"), pipeline="dali")))
    assert not (tmp_path / "dali").exists()  # stopped before any work
    # the command line, in a process where ``import nvidia.dali`` fails (installed or not here)
    code = ("import runpy, sys; sys.modules['nvidia.dali'] = None; "
            f"sys.argv = ['sepico_fast.train', '--pipeline', 'dali', '--work-dir', {str(tmp_path / 'dali')!r}]; "
            "runpy.run_module('sepico_fast.train', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("--pipeline: dali requested")
    assert not (tmp_path / "dali").exists()
