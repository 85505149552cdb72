"""Dark Zurich is resized to fit 1280x720 (method §1), for training (night and day reference),
evaluation, the DALI pipeline and the ``prepare --cache`` copies; Cityscapes stays 1280x640.

Expected sizes come from mmcv's rescale rule written here: factor
min(long / max(h, w), short / min(h, w)), new side int(side * factor + 0.5).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sepico_fast.data import TrainLoader, build_datasets, build_val_set, dataset_defaults
from sepico_fast.prepare import prepare


def mmcv_fit(h: int, w: int, long: int, short: int) -> tuple[int, int]:
    f = min(long / max(h, w), short / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def test_default_scales():
    dz = dataset_defaults("cityscapes", "darkzurich")
    assert dz["target_scale"] == dz["eval_scale"] == (1280, 720)
    assert mmcv_fit(1080, 1920, *dz["target_scale"]) == (720, 1280)  # not 640x1138 as with 1280x640
    cs = dataset_defaults("gta", "cityscapes")
    assert cs["target_scale"] == cs["eval_scale"] == (1280, 640)
    assert mmcv_fit(1024, 2048, *cs["eval_scale"]) == (640, 1280)
    assert dataset_defaults("cityscapes", "darkzurich")["source_scale"] == (1280, 640)


@pytest.fixture
def dz_data(tmp_path):
    from tests.test_prepare import make_cityscapes, make_darkzurich

    make_darkzurich(tmp_path / "dark_zurich")  # 27x48 frames: 16:9 like the 1920x1080 originals
    make_cityscapes(tmp_path / "cityscapes")
    prepare("cityscapes", tmp_path / "cityscapes", workers=0, progress=False)
    return tmp_path


def test_training_and_validation_sets_fit_1280x720(dz_data):
    prepare("darkzurich", dz_data / "dark_zurich", workers=0, progress=False)
    src, tgt, val = build_datasets("cityscapes", "darkzurich", dz_data, rcs=False)
    want = mmcv_fit(27, 48, 1280, 720)
    assert want == (720, 1280)
    assert tgt.resized_size(0) == want and val.resized_size(0) == want
    assert build_val_set("darkzurich", dz_data).resized_size(0) == want
    sample = tgt.render(tgt.plan(np.random.default_rng(0)))
    assert sample["img"].shape == sample["ref_img"].shape == (3, *want)  # night and day reference alike
    assert val[0]["img"].shape[-2:] == want and val[0]["gt"].shape[-2:] == (27, 48)


def test_prepare_cache_writes_dark_zurich_at_1280x720(dz_data):
    root = dz_data / "dark_zurich"
    prepare("darkzurich", root, workers=0, progress=False, cache="png")
    croot = root / ".sepico_cache" / "png_1280x720"
    files = sorted(croot.rglob("*_rgb_anon.png"))
    assert len(files) == 5  # 2 night + 2 day references + 1 val
    assert all(Image.open(f).size == (1280, 720) for f in files)
    plain = build_datasets("cityscapes", "darkzurich", dz_data, rcs=False)
    prepare("cityscapes", dz_data / "cityscapes", workers=0, progress=False, cache="png")
    cached = build_datasets("cityscapes", "darkzurich", dz_data, rcs=False, cache="png")
    assert cached[1].entries[0].image.is_relative_to(croot) and cached[2].entries[0].image.is_relative_to(croot)
    plan = plain[1].plan(np.random.default_rng(1))
    a, b = plain[1].render(plan), cached[1].render(plan)
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["ref_img"], b["ref_img"])  # png cache is lossless
    assert torch.equal(plain[2][0]["img"], cached[2][0]["img"])


def test_dali_renders_dark_zurich_at_1280x720(dz_data):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    prepare("darkzurich", dz_data / "dark_zurich", workers=0, progress=False)
    src, tgt, _ = build_datasets("cityscapes", "darkzurich", dz_data, rcs=False, crop_size=(32, 32))
    (_, t_torch), = list(TrainLoader(src, tgt, 1, 0, num_iters=1, pipeline="torch"))
    (_, t_dali), = list(TrainLoader(src, tgt, 1, 0, num_iters=1, pipeline="dali", num_workers=1))
    for k in ("img", "ref_img"):
        assert t_torch[k].shape == t_dali[k].shape == (1, 3, 720, 1280)
        assert (t_torch[k] - t_dali[k]).abs().max() <= 1.0 / 57.12 + 1e-5  # one uint8 level
