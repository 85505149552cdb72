"""Damaged or wrong data files and a full or unwritable disk: every case is one line naming
the file (``prepare``, ``prepare --check``, training, evaluation), and no temp file or
half-written folder stays behind."""
from __future__ import annotations

import errno
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sepico_fast.data import TrainLoader, build_datasets, io, synthetic, val_loader
from sepico_fast.data.io import DataFileError
from sepico_fast.prepare import main
from tests.test_prepare import H, W, _ids, make_cityscapes, make_gta

ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 4_000_000  # above Linux's pid_max: never a live process


def _prepare_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sepico_fast.prepare", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _run(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def _palette_label(path: Path, ids: np.ndarray) -> None:
    im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids).tobytes())
    im.putpalette(list(range(256)) * 3)
    im.save(path)


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG whose header says side x side pixels (past twice PIL's limit): PIL refuses it on open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(io.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _prepared(tmp_path: Path, capsys) -> Path:
    make_gta(tmp_path / "gta")
    make_cityscapes(tmp_path / "cityscapes")
    for name in ("gta", "cityscapes"):
        assert _run(capsys, name, tmp_path / name)[0] == 0
    return tmp_path


def _datasets(root: Path):
    return build_datasets("gta", "cityscapes", data_root=root, source_scale=(40, 24), target_scale=(32, 16),
                          crop_size=(16, 16), eval_scale=(32, 16), rcs=False)


# ----------------------------------------------------------------------------- labels and images

def test_label_of_another_aspect_ratio_named_by_prepare_check_training_and_evaluation(tmp_path, capsys):
    make_gta(tmp_path / "g")
    bad = tmp_path / "g" / "labels" / "00002.png"
    _palette_label(bad, _ids(1)[:, : W // 2])  # 24x20 for a 24x40 image
    proc = _prepare_cli("gta", tmp_path / "g")
    line = _one_line(proc.stderr)
    assert proc.returncode == 1 and str(bad) in line and "another aspect ratio" in line and "24x20" in line
    # the same shape at twice the size is resized onto the image, as the authors' pipeline does
    _palette_label(bad, np.repeat(np.repeat(_ids(1), 2, 0), 2, 1))
    assert _run(capsys, "gta", tmp_path / "g")[0] == 0

    root = _prepared(tmp_path / "d", capsys)
    lbl = root / "gta" / "labels" / "00002_labelTrainIds.png"
    Image.fromarray(np.zeros((H, W // 2), np.uint8)).save(lbl)  # valid ids, wrong shape
    code, err = _run(capsys, "gta", root / "gta", "--check")
    assert code == 1 and str(lbl) in err and "another aspect ratio" in err
    src, tgt, val = _datasets(root)
    src.entries = [src.entries[1]]
    with pytest.raises(DataFileError, match="another aspect ratio") as exc:
        TrainLoader(src, tgt, 1, seed=0, pipeline="torch", num_workers=1, num_iters=1).__iter__().__next__()
    assert exc.value.path == str(lbl) and "\n" not in str(exc.value)
    with pytest.raises(DataFileError, match="another aspect ratio"):  # what the DALI pipeline reads
        src.label_size(0)
    vlbl = val.entries[0].label
    Image.fromarray(np.zeros((64, 32), np.uint8)).save(vlbl)  # transposed
    with pytest.raises(DataFileError, match="another aspect ratio") as exc:
        next(val_loader(val))
    assert exc.value.path == str(vlbl)


def test_lossy_labels_named_by_prepare_check_and_training(tmp_path, capsys):
    # a JPEG renamed .png as a label
    make_gta(tmp_path / "g")
    bad = tmp_path / "g" / "labels" / "00002.png"
    Image.fromarray(_ids(1)).save(bad, format="JPEG", quality=90)
    proc = _prepare_cli("gta", tmp_path / "g")
    line = _one_line(proc.stderr)
    assert proc.returncode == 1 and str(bad) in line and "a JPEG file, not a PNG" in line
    # a PNG holding values that are no label id (re-encoded through a lossy format, or re-coloured)
    make_cityscapes(tmp_path / "c")
    raw = next((tmp_path / "c" / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    ids = _ids(0, (32, 64))
    ids[3, :7] = 200
    Image.fromarray(ids).save(raw)
    code, err = _run(capsys, "cityscapes", tmp_path / "c")
    assert code == 1 and str(raw) in _one_line(err) and "value 200 is not a Cityscapes label id" in err

    # --check decodes the labels as distributed too: one replaced after prepare is named
    root = _prepared(tmp_path / "d", capsys)
    raw = root / "gta" / "labels" / "00003.png"
    Image.fromarray(_ids(2)).save(raw, format="JPEG", quality=90)
    code, err = _run(capsys, "gta", root / "gta", "--check")
    assert code == 1 and str(raw) in _one_line(err) and "not a PNG" in err
    # a train-id map that is a JPEG: named at training time, also from a loader worker
    lbl = root / "gta" / "labels" / "00002_labelTrainIds.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(lbl, format="JPEG")
    src, tgt, _ = _datasets(root)
    src.entries = [src.entries[1]]
    with pytest.raises(DataFileError, match="not a PNG") as exc:
        next(iter(TrainLoader(src, tgt, 1, seed=0, pipeline="torch", num_workers=1, num_iters=1)))
    assert exc.value.path == str(lbl)


def test_image_past_the_pixel_limit_named_everywhere(tmp_path, capsys, monkeypatch):
    make_gta(tmp_path / "g")
    bomb = tmp_path / "g" / "images" / "00002.png"
    _bomb_png(bomb)
    proc = _prepare_cli("gta", tmp_path / "g")
    line = _one_line(proc.stderr)
    assert proc.returncode == 1 and str(bomb) in line and "MAX_IMAGE_PIXELS" in line
    root = _prepared(tmp_path / "d", capsys)
    bomb = root / "gta" / "images" / "00003.png"
    _bomb_png(bomb)  # after prepare: --check names it
    code, err = _run(capsys, "gta", root / "gta", "--check")
    assert code == 1 and str(bomb) in _one_line(err) and "MAX_IMAGE_PIXELS" in err
    # training (loader worker) and evaluation
    src, tgt, val = _datasets(root)
    _bomb_png(Path(src.entries[1].image))
    src.entries = [src.entries[1]]
    with pytest.raises(DataFileError, match="exceeds limit") as exc:
        next(iter(TrainLoader(src, tgt, 1, seed=0, pipeline="torch", num_workers=1, num_iters=1)))
    assert exc.value.path == str(src.entries[0].image)
    _bomb_png(Path(val.entries[0].image))
    with pytest.raises(DataFileError, match="MAX_IMAGE_PIXELS"):
        next(val_loader(val))
    # between the limit and twice it PIL only warns (and decodes): named as well
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 2)
    with pytest.raises(DataFileError, match="00001.png: .*exceeds limit"):
        io.read_image(tmp_path / "g" / "images" / "00001.png")


# ----------------------------------------------------------------------------- a full disk

def _full_disk_save(monkeypatch, after: int = 0):
    """PIL's save writes an empty file, then the disk is full (after ``after`` good saves)."""
    real = Image.Image.save
    calls = [0]

    def save(self, fp, *args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            Path(fp).write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_on_a_full_disk_one_line_and_no_temp_files(tmp_path, capsys, monkeypatch, workers):
    make_gta(tmp_path, n=40 if workers else 3)  # more than 32 files: a pool of worker processes
    stale = tmp_path / "labels" / f"{io.TEMP_PREFIX}00001_labelTrainIds.png.{DEAD_PID}.tmp"
    stale.write_bytes(b"")  # left by a killed earlier run
    with monkeypatch.context() as m:
        _full_disk_save(m)
        code, err = _run(capsys, "gta", tmp_path, "--workers", workers)
    line = _one_line(err)
    assert code == 1 and "No space left on device" in line and "_labelTrainIds.png" in line
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*_labelTrainIds.png"))
    assert not (tmp_path / "sample_class_stats.json").exists()
    stale.write_bytes(b"")
    assert _run(capsys, "gta", tmp_path, "--workers", workers)[0] == 0  # the rerun finishes and cleans up
    assert not list(tmp_path.rglob("*.tmp")) and (tmp_path / "sample_class_stats.json").is_file()


def test_prepare_into_an_unwritable_folder_one_line(tmp_path, capsys, monkeypatch):
    make_gta(tmp_path)
    real_replace = os.replace

    def replace(src, dst, *a, **kw):  # as root, chmod does not deny writes: the rename fails instead
        if str(dst).endswith("_labelTrainIds.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    code, err = _run(capsys, "gta", tmp_path, "--workers", "0")
    assert code == 1 and "Permission denied" in _one_line(err)
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- the synthetic pair

TINY_SYN = dict(num_source=2, num_target_train=2, num_target_val=1)


def test_synthetic_generation_on_a_full_disk_removes_its_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    killed = cache / f".tmp-0123456789-{DEAD_PID}"  # the folder of a generation killed with -9
    (killed / "source" / "images").mkdir(parents=True)
    (killed / "source" / "images" / "00000.png").write_bytes(b"\x00" * 1000)
    with monkeypatch.context() as m:
        _full_disk_save(m, after=3)
        with pytest.raises(synthetic.SyntheticDataError) as exc:
            synthetic.ensure_synthetic(cache, **TINY_SYN)
    msg = str(exc.value)
    assert "\n" not in msg and "No space left on device" in msg and "SEPICO_FAST_CACHE" in msg
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]  # no half-written folder, the killed one gone
    # a full disk inside the preparation step, too
    with monkeypatch.context() as m:
        m.setattr(io, "write_label", lambda path, label: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
        with pytest.raises(synthetic.SyntheticDataError, match="No space"):
            synthetic.ensure_synthetic(cache, **TINY_SYN)
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]
    paths = synthetic.ensure_synthetic(cache, **TINY_SYN)  # with space again: generated
    assert (paths.source.parent / "COMPLETE.json").is_file()


def test_synthetic_generation_into_an_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(synthetic.SyntheticDataError, match=re.escape(f"to {blocker / 'sub'}: Not a directory")):
        synthetic.ensure_synthetic(blocker / "sub", **TINY_SYN)
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):  # a read-only cache folder (chmod does not stop root)
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(synthetic.SyntheticDataError, match="Read-only file system") as exc:
        synthetic.ensure_synthetic(tmp_path / "ro", **TINY_SYN)
    assert "\n" not in str(exc.value)


def test_trainer_with_an_unwritable_synthetic_cache_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEPICO_FAST_CACHE=str(blocker))
    proc = subprocess.run([sys.executable, "-m", "sepico_fast.train", "--iters", "1", "--work-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("synthetic data: cannot write the synthetic data set to ") and "Not a directory" in last


def test_trainer_names_a_label_of_another_aspect_ratio_from_a_loader_worker(tmp_path, capsys):
    """End to end: the DataLoader worker's error is the trainer's one line, not a worker traceback."""
    from tests.test_prepare import _img

    make_cityscapes(tmp_path / "cityscapes")
    for i in range(3):  # big enough for rare class sampling's pixel thresholds
        _img(tmp_path / "gta" / "images" / f"{i + 1:05d}.png", i, (80, 120))
        (tmp_path / "gta" / "labels").mkdir(exist_ok=True)
        _palette_label(tmp_path / "gta" / "labels" / f"{i + 1:05d}.png", _ids(i, (80, 120)))
    for name in ("gta", "cityscapes"):
        assert _run(capsys, name, tmp_path / name)[0] == 0
    for i in range(3):
        Image.fromarray(np.zeros((80, 60), np.uint8)).save(tmp_path / "gta" / "labels" / f"{i + 1:05d}_labelTrainIds.png")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "sepico_fast.train", "--source", "gta", "--target", "cityscapes",
                           "--data-root", str(tmp_path), "--iters", "2", "--crop", "16", "--proj-dim", "16",
                           "--batch-size", "1", "--debug-interval", "0", "--num-workers", "1",
                           "--work-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sepico_fast.train: error: cannot use {tmp_path / 'gta' / 'labels'}")
    assert "another aspect ratio" in last
