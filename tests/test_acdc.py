"""ACDC as a target: its official layout, `prepare acdc`, the DAFormer family's 960x540 scales,
per-condition validation mIoU, and a training smoke run with an ACDC-layout fixture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sepico_fast.data import build_datasets, build_val_set, dataset_defaults, val_loader
from sepico_fast.data.layouts import ACDC_CONDITIONS, acdc_condition, list_files, server_test_files
from sepico_fast.prepare import main as prepare_main
from tests.test_prepare import _ids, _img, _train_ids, make_cityscapes

ACDC_HW = (27, 48)  # 16:9 like the 1920x1080 originals
SEQS = {"fog": "GOPR0475", "night": "GOPR0351", "rain": "GOPR0400", "snow": "GOPR0122"}


def make_acdc(root: Path, conditions=ACDC_CONDITIONS, hw=ACDC_HW) -> None:
    """The official ACDC tree: rgb_anon/<cond>/{train,val,test}/<seq>/*_rgb_anon.png and
    gt/<cond>/{train,val}/<seq>/*_gt_labelTrainIds.png (+ the label-id / colour maps and the
    train_ref reference images the release also holds, which are not used)."""
    for c, cond in enumerate(conditions):
        seq = SEQS[cond]
        for s, split in enumerate(("train", "val", "test")):
            stem = f"{seq}_frame_{100 * s + c:06d}"
            _img(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", 10 * c + s, hw)
            if split == "test":
                continue
            gt = root / "gt" / cond / split / seq
            gt.mkdir(parents=True, exist_ok=True)
            ids = _ids(c + s, hw)
            Image.fromarray(_train_ids(ids)).save(gt / f"{stem}_gt_labelTrainIds.png")
            Image.fromarray(ids).save(gt / f"{stem}_gt_labelIds.png")
            Image.fromarray(np.zeros(hw + (3,), np.uint8)).save(gt / f"{stem}_gt_labelColor.png")
        _img(root / "rgb_anon" / cond / "train_ref" / seq / f"{seq}_frame_000000_ref_anon.png", 99, hw)


def test_layout_lists_every_condition_and_split(tmp_path):
    make_acdc(tmp_path)
    for split in ("train", "val"):
        entries = list_files("acdc", tmp_path, split)
        assert [acdc_condition(e.image) for e in entries] == list(ACDC_CONDITIONS)
        assert all(e.label.name == f"{e.name}_gt_labelTrainIds.png" and e.image.name == f"{e.name}_rgb_anon.png"
                   for e in entries)
    test = server_test_files("acdc", tmp_path)
    assert len(test) == 4 and all(e.label is None for e in test)
    assert acdc_condition("x/GOPR0475_frame_000001_rgb_anon.png") == ""


def test_prepare_acdc_on_the_official_tree(tmp_path, capsys):
    make_acdc(tmp_path)
    assert prepare_main(["acdc", str(tmp_path), "--quiet", "--workers", "0"]) == 0
    assert "acdc: 8 labels" in capsys.readouterr().out
    stats = json.loads((tmp_path / "sample_class_stats.json").read_text())
    assert len(stats["files"]) == 8 and all(k.startswith("gt/") for k in stats["files"])
    assert prepare_main(["acdc", str(tmp_path), "--check", "--quiet", "--workers", "0"]) == 0
    # a label holding a value that is not a train id: exit 1, the file named in one line
    bad = next((tmp_path / "gt" / "rain" / "val").rglob("*_gt_labelTrainIds.png"))
    arr = np.array(Image.open(bad))
    arr[0, 0] = 40
    Image.fromarray(arr).save(bad)
    assert prepare_main(["acdc", str(tmp_path), "--quiet", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "40" in err
    # a folder without the layout: exit 2, one line naming the layout
    (tmp_path / "empty").mkdir()
    assert prepare_main(["acdc", str(tmp_path / "empty"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rgb_anon/{fog,night,rain,snow}" in err


def test_daformer_family_scales(tmp_path):
    d = dataset_defaults("cityscapes", "acdc")
    assert (d["source_scale"], d["target_scale"], d["eval_scale"], d["crop_size"]) == \
        ((1024, 512), (960, 540), (960, 540), (512, 512))
    assert dataset_defaults("cityscapes", "darkzurich")["source_scale"] == (1280, 640)  # others unchanged
    make_cityscapes(tmp_path / "cityscapes")
    make_acdc(tmp_path / "acdc")
    assert prepare_main(["cityscapes", str(tmp_path / "cityscapes"), "--quiet"]) == 0
    assert prepare_main(["acdc", str(tmp_path / "acdc"), "--quiet"]) == 0
    src, tgt, val = build_datasets("cityscapes", "acdc", tmp_path, rcs=False)
    assert src.resized_size(0) == (512, 1024) and src.crop_size == (512, 512)
    assert tgt.resized_size(0) == (540, 960) and val.resized_size(0) == (540, 960)
    sample = build_val_set("acdc", tmp_path)[2]
    assert sample["group"] == "rain" and sample["gt"].shape[-2:] == ACDC_HW


def test_per_condition_miou_in_evaluate(tmp_path):
    from sepico_fast.evaluate import evaluate_model, group_summary
    from sepico_fast.metrics import ConfusionMatrix

    make_acdc(tmp_path / "acdc")
    assert prepare_main(["acdc", str(tmp_path / "acdc"), "--quiet"]) == 0
    val = build_val_set("acdc", tmp_path, eval_scale=(48, 27))

    class Road(torch.nn.Module):  # predicts road (0) everywhere but on dark pixels: building (2)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def predict(self, img):
            dark = (img[:, :1] < 0).float()
            return torch.cat([1 - dark, torch.zeros_like(dark), dark] + [torch.zeros_like(dark)] * 16, 1) * self.w

    from sepico_fast.evaluate import dark_zurich_class_weights

    groups, report = {}, {}
    cm = evaluate_model(Road(), val_loader(val), 19, groups=groups, report=report,
                        test_class_weight=dark_zurich_class_weights())
    assert report["reweighted_images"] == 0  # ACDC images are never re-weighted, although *_rgb_anon.png
    assert list(group_summary(groups)) == list(ACDC_CONDITIONS)
    total = ConfusionMatrix(19)
    for g in groups.values():
        total.state += g.state
    assert torch.equal(total.state, cm.state)  # the conditions partition the val set
    batches = list(val_loader(val))
    for cond, batch in zip(ACDC_CONDITIONS, batches):  # one image per condition: its own matrix
        assert batch["group"] == cond
        assert torch.equal(evaluate_model(Road(), [batch], 19).state, groups[cond].state)


@pytest.fixture
def small_scales(monkeypatch):
    from sepico_fast.data import datasets, layouts

    monkeypatch.setitem(layouts.TRAIN_SCALES, "acdc", (96, 54))
    monkeypatch.setitem(datasets.EVAL_SCALES, "acdc", (64, 36))
    monkeypatch.setitem(datasets.PAIR_DEFAULTS, ("cityscapes", "acdc"),
                        {"source_scale": (64, 32), "crop_size": (32, 32), "rcs_min_pixels": 10,
                         "rcs_min_crop_pixels": 5})


def test_training_smoke_run_with_acdc_target(tmp_path, small_scales, capsys):
    """Cityscapes -> ACDC with the tiny model for a few iterations: the run trains on the
    ACDC-layout fixture, evaluates on its val set and records the mIoU of each condition."""
    from sepico_fast.train import make_config
    from sepico_fast.train.runner import run

    make_cityscapes(tmp_path / "cityscapes")
    make_acdc(tmp_path / "acdc")
    assert prepare_main(["cityscapes", str(tmp_path / "cityscapes"), "--quiet"]) == 0
    assert prepare_main(["acdc", str(tmp_path / "acdc"), "--quiet"]) == 0
    work = tmp_path / "run"
    cfg = make_config(dict(source="cityscapes", target="acdc", data_root=str(tmp_path), arch="dlv2_tiny",
                           iters=3, crop=[32, 32], batch_size=1, contrast_start=1, warmup_iters=1, log_interval=3,
                           checkpoint_interval=0, debug_interval=0, num_workers=0, proj_dim=16,
                           pseudo_threshold=0.2, work_dir=str(work)))
    metrics = run(cfg)
    out = capsys.readouterr().out
    saved = json.loads((work / "metrics.json").read_text())
    assert saved["target"] == "acdc" and saved["iters"] == 3 and 0 <= saved["miou"] <= 100
    assert list(saved["per_condition"]) == list(ACDC_CONDITIONS) == list(metrics["per_condition"])
    assert all(0 <= r["miou"] <= 100 and len(r["per_class_iou"]) == 19 for r in saved["per_condition"].values())
    assert saved["dz_test_reweight"]["enabled"] is False
    assert "per condition mIoU: fog" in out
