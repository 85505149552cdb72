"""The trainer's input pipeline: ``--cache`` (prepare's pre-resized copies), its auto-detection,
the default number of loader workers, and the data-wait fraction in the log.

* ``--cache png`` batches are bit-identical to decoding the originals (validation too);
  ``--cache jpeg`` differs only in the image pixels (labels identical; see docs/data.md).
* ``--cache auto`` (the default) reads a dataset's png cache only when every file the run
  reads has a cached copy newer than its original; otherwise it decodes the originals and
  says why in one line. An explicit ``--cache png|jpeg`` that is not usable stops the run
  with one line and exit status 2.
"""
from __future__ import annotations

import json
import os
import shutil
import types

import pytest
import torch

from sepico_fast.data import TrainLoader, build_datasets, val_loader
from sepico_fast.data import loader as loader_mod
from sepico_fast.data.cache import CacheError
from sepico_fast.prepare import main as prepare_main
from sepico_fast.train import runner
from sepico_fast.train.config import PRESETS, make_config
from tests.test_prepare import make_cityscapes, make_gta

SCALES = dict(source_scale=(30, 18), target_scale=(32, 16), crop_size=(12, 12), eval_scale=(32, 16),
              rcs_min_pixels=10, rcs_min_crop_pixels=5)


@pytest.fixture
def pair(tmp_path, capsys):
    """GTA + Cityscapes in miniature, prepared, with a png cache at the scales of SCALES."""
    make_gta(tmp_path / "gta")
    make_cityscapes(tmp_path / "cityscapes")
    for name, scale in (("gta", ("30", "18")), ("cityscapes", ("32", "16"))):
        assert prepare_main([name, str(tmp_path / name), "--workers", "0", "--quiet", "--cache", "png",
                             "--cache-scale", *scale]) == 0
    capsys.readouterr()
    return tmp_path


def _batches(sets, iters=3):
    loader = TrainLoader(*sets[:2], 2, seed=7, pipeline="torch", num_workers=0)
    return [loader.batch(t) for t in range(iters)]


def _assert_same(a, b):
    for (sa, ta), (sb, tb) in zip(a, b):
        assert torch.equal(sa["img"], sb["img"]) and torch.equal(sa["gt"], sb["gt"])
        assert torch.equal(ta["img"], tb["img"])


def test_cache_png_reads_the_same_batches_as_decoding_and_auto_finds_it(pair):
    off = build_datasets("gta", "cityscapes", data_root=pair, cache="off", **SCALES)
    auto = build_datasets("gta", "cityscapes", data_root=pair, cache="auto", **SCALES)
    assert off[0].cache is None and off[1].cache is None and off[0].cache_note == ""
    assert auto[0].cache == "png" and auto[1].cache == "png" and auto[2].cache == "png"
    assert ".sepico_cache" in str(auto[0].entries[0].image) and "png cache" in auto[0].cache_note
    _assert_same(_batches(off), _batches(auto))
    va, vb = next(val_loader(off[2])), next(val_loader(auto[2]))
    assert torch.equal(va["img"], vb["img"]) and torch.equal(va["gt"], vb["gt"])
    # another training scale has no cache: auto decodes the originals, silently (nothing to say)
    other = build_datasets("gta", "cityscapes", data_root=pair, cache="auto", **dict(SCALES, source_scale=(40, 24)))
    assert other[0].cache is None and other[0].cache_note == "" and other[1].cache == "png"


def test_partial_or_stale_cache_is_ignored_by_auto_with_one_line_and_refused_when_asked(pair):
    cached = pair / "gta" / ".sepico_cache" / "png_30x18" / "images" / "00002.png"
    cached.unlink()
    src = build_datasets("gta", "cityscapes", data_root=pair, cache="auto", **SCALES)[0]
    assert src.cache is None and ".sepico_cache" not in str(src.entries[0].image)
    note = src.cache_note
    assert "\n" not in note and "png cache ignored (partial" in note and str(cached) in note
    assert f"python -m sepico_fast.prepare gta {pair / 'gta'} --cache png" in note
    with pytest.raises(CacheError, match="cached files missing"):
        build_datasets("gta", "cityscapes", data_root=pair, cache="png", **SCALES)

    assert prepare_main(["gta", str(pair / "gta"), "--workers", "0", "--quiet", "--cache", "png",
                         "--cache-scale", "30", "18"]) == 0  # rewrites the missing file
    assert build_datasets("gta", "cityscapes", data_root=pair, cache="auto", **SCALES)[0].cache == "png"
    original = pair / "cityscapes" / "leftImg8bit" / "train" / "bremen" / "bremen_000001_000019_leftImg8bit.png"
    later = os.stat(original).st_mtime + 60
    os.utime(original, (later, later))  # the original replaced after the cache was written
    tgt = build_datasets("gta", "cityscapes", data_root=pair, cache="auto", **SCALES)[1]
    assert tgt.cache is None and "png cache ignored (stale" in tgt.cache_note and "older than" in tgt.cache_note
    with pytest.raises(CacheError, match="older than their originals"):
        build_datasets("gta", "cityscapes", data_root=pair, cache="png", **SCALES)


def test_jpeg_cache_is_used_only_when_asked_and_changes_only_image_pixels(pair):
    for name, scale in (("gta", ("30", "18")), ("cityscapes", ("32", "16"))):
        assert prepare_main([name, str(pair / name), "--workers", "0", "--quiet", "--cache", "jpeg",
                             "--cache-scale", *scale]) == 0
    shutil.rmtree(pair / "gta" / ".sepico_cache" / "png_30x18")
    src = build_datasets("gta", "cityscapes", data_root=pair, cache="auto", **SCALES)[0]
    assert src.cache is None and "pass --cache jpeg" in src.cache_note
    off = build_datasets("gta", "cityscapes", data_root=pair, cache="off", **SCALES)
    jpeg = build_datasets("gta", "cityscapes", data_root=pair, cache="jpeg", **SCALES)
    assert jpeg[0].cache == "jpeg"
    for (sa, ta), (sb, tb) in zip(_batches(off), _batches(jpeg)):
        assert torch.equal(sa["gt"], sb["gt"])  # labels are cached as lossless PNGs
        assert (sa["img"] - sb["img"]).abs().mean() < 0.5 and (ta["img"] - tb["img"]).abs().mean() < 0.5


def test_trainer_refuses_an_unusable_cache_with_one_line(tmp_path, capsys, monkeypatch):
    import sepico_fast.data as data_mod
    real = data_mod.build_datasets
    monkeypatch.setattr(data_mod, "build_datasets", lambda *a, **k: real(*a, **dict(k, rcs=False)))  # tiny files
    make_gta(tmp_path / "gta")
    make_cityscapes(tmp_path / "cityscapes")
    for name in ("gta", "cityscapes"):
        assert prepare_main([name, str(tmp_path / name), "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    cfg = make_config(dict(source="gta", target="cityscapes", data_root=str(tmp_path), cache="png", crop=[8, 8]))
    with pytest.raises(SystemExit) as stop:
        runner._datasets(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("--cache: ")
    assert "--cache png" in err[0] and "Traceback" not in err[0]
    with pytest.raises(ValueError, match="--cache: expected one of"):
        make_config(dict(cache="yes"))


def test_default_workers_come_from_the_cpu_count(monkeypatch):
    cfg = make_config()
    assert cfg.num_workers == -1 and cfg.cache == "auto"
    assert all("num_workers" not in p for p in PRESETS.values()), "the paper presets use the default too"
    with pytest.raises(ValueError, match="--num-workers"):
        make_config(dict(num_workers=-2))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(loader_mod, "usable_cpus", lambda: 16)
    assert loader_mod.default_num_workers(1) == 8 and loader_mod.default_num_workers(4) == 3
    assert loader_mod.default_num_workers(1, in_memory=True) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: ranks on this machine, not in the job
    assert loader_mod.default_num_workers(8) == 7
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(loader_mod, "usable_cpus", lambda: 2)
    assert loader_mod.default_num_workers(1) == 1 and loader_mod.default_num_workers(2) == 1
    assert 1 <= loader_mod.usable_cpus() <= (os.cpu_count() or 1)


def test_synthetic_default_run_keeps_zero_workers(tmp_path):
    sets = build_datasets("synthetic", "synthetic", cache="auto")
    assert sets[0].cache is None and sets[0].cache_note == ""
    loader = TrainLoader(*sets[:2], 2, seed=0, pipeline="torch", num_workers=None)
    assert loader.num_workers == 0  # held in memory: the main process renders faster than a worker


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_data_wait_fraction_is_logged_and_written(tmp_path, monkeypatch, capsys):
    """A tiny real run on a fake clock: every batch takes 1 s to arrive, every step 3 s, so
    the loop waits for data a quarter of its wall time."""
    clock = _Clock()
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=clock))
    real_step, real_iter = runner.train_step, loader_mod.TrainLoader.__iter__

    def slow_step(*a, **k):
        clock.t += 3.0
        return real_step(*a, **k)

    def slow_batches(self):
        for batch in real_iter(self):
            clock.t += 1.0
            yield batch

    monkeypatch.setattr(runner, "train_step", slow_step)
    monkeypatch.setattr(loader_mod.TrainLoader, "__iter__", slow_batches)
    cfg = make_config(dict(iters=4, crop=[32, 32], batch_size=1, proj_dim=16, contrast_start=1, warmup_iters=1,
                           log_interval=2, checkpoint_interval=0, debug_interval=0, eval_max_images=1,
                           work_dir=str(tmp_path)))
    runner.run(cfg)
    out = capsys.readouterr().out
    assert "data: torch pipeline, 0 workers (--num-workers -1: data held in memory)" in out
    rows = [r for r in map(json.loads, (tmp_path / "scalars.jsonl").read_text().splitlines())
            if "images_per_s" in r]
    assert [r["data_wait"] for r in rows] == [pytest.approx(0.25)] * 2
    assert "data wait 25%" in out
