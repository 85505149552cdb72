"""Evaluation: whole-image and sliding inference, IoU, PNG/zip output, the CLI."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sepico_fast.evaluate import evaluate_model, iou_summary, main, zip_predictions


class PointwiseModel(torch.nn.Module):
    """Logits at full resolution: class = round(first channel), clamped to 0..3."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def predict(self, img):
        cls = img[:, 0].round().clamp(0, 3).long()
        return torch.nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).float() * self.w


def _batch(pred_map, gt_map, name):
    img = torch.zeros(1, 3, *pred_map.shape)
    img[0, 0] = pred_map.float()
    return {"img": img, "gt": gt_map.view(1, 1, *gt_map.shape), "name": name}


def test_iou_and_predictions(tmp_path):
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 3]])
    gt = torch.tensor([[0, 1, 1, 1], [2, 255, 3, 3]])
    model = PointwiseModel()
    model.train()
    cm = evaluate_model(model, [_batch(pred, gt, "aachen_000000_000019_leftImg8bit.png")], 4, out_dir=tmp_path)
    assert model.training  # restored
    iou = cm.iou().tolist()
    # class 0: tp1 fp1 fn0 -> 1/2; class 1: tp2 fp1 fn1 -> 2/4; class 2: tp1 -> 1; class 3: tp1 fn1 -> 1/2
    assert iou == pytest.approx([0.5, 0.5, 1.0, 0.5])
    summary = iou_summary(cm)
    assert summary["miou"] == pytest.approx(62.5) and summary["miou_unit"] == "percent"
    png = tmp_path / "labelTrainIds" / "aachen_000000_000019.png"
    assert np.array_equal(np.array(Image.open(png)), pred.numpy().astype(np.uint8))
    archive = zip_predictions(tmp_path)
    assert zipfile.ZipFile(archive).namelist() == ["labelTrainIds/aachen_000000_000019.png"]


def test_sliding_equals_whole_for_pointwise_model():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (37, 53), generator=g)
    gt = torch.randint(0, 4, (37, 53), generator=g)
    model = PointwiseModel()
    whole = evaluate_model(model, [_batch(pred, gt, "a.png")], 4)
    slide = evaluate_model(model, [_batch(pred, gt, "a.png")], 4, sliding=True, crop=(16, 16))
    assert torch.equal(whole.state, slide.state)
    assert int(whole.state.sum()) == 37 * 53


def test_cli_on_synthetic_checkpoint(tmp_path):
    from sepico_fast.models import build_segmentor
    from sepico_fast.train.config import make_config
    from sepico_fast.train.run_checkpoints import atomic_save, prefixed

    cfg = make_config({"proj_dim": 16})
    model = build_segmentor(cfg.arch, 19, 16)
    ckpt = atomic_save({"state_dict": prefixed("model.", model.state_dict()), "meta": {"iter": 0, "config": cfg.to_dict()}},
                       tmp_path / "ckpt.pt")
    out = tmp_path / "pred"
    result = main(["--checkpoint", str(ckpt), "--max-images", "2", "--out", str(out)])
    assert result["dataset"] == "synthetic" and 0 <= result["miou"] <= 100
    assert len(list((out / "labelTrainIds").glob("*.png"))) == 2
    assert json.loads((out / "metrics.json").read_text())["miou_unit"] == "percent"
    with pytest.raises(SystemExit, match="--checkpoint"):
        main(["--checkpoint", str(tmp_path / "missing.pt")])


def test_cli_evaluates_cityscapes_without_any_source_dataset(tmp_path):
    """Only the evaluation set is loaded: a data root holding nothing but a prepared
    Cityscapes must be enough (no GTA/SYNTHIA folder)."""
    from sepico_fast.models import build_segmentor
    from sepico_fast.prepare import main as prepare_main
    from sepico_fast.train.config import make_config
    from sepico_fast.train.run_checkpoints import atomic_save, prefixed
    from tests.test_prepare import make_cityscapes

    root = tmp_path / "data"
    make_cityscapes(root / "cityscapes")
    assert prepare_main(["cityscapes", str(root / "cityscapes"), "--quiet"]) == 0
    cfg = make_config({"proj_dim": 16})
    model = build_segmentor(cfg.arch, 19, 16)
    ckpt = atomic_save({"state_dict": prefixed("model.", model.state_dict()), "meta": {"iter": 0, "config": cfg.to_dict()}},
                       tmp_path / "ckpt.pt")
    result = main(["--checkpoint", str(ckpt), "--dataset", "cityscapes", "--data-root", str(root)])
    assert result["dataset"] == "cityscapes" and 0 <= result["miou"] <= 100


def test_unresolved_crop_zero_is_the_dataset_default(tmp_path):
    """Checkpoints whose config says crop [0, 0] (--crop 0 under --ddp-schedule samples was
    stored unresolved): --sliding uses the pair's default crop instead of failing in torch."""
    from sepico_fast.data import dataset_defaults
    from sepico_fast.evaluate import training_crop
    from sepico_fast.models import build_segmentor
    from sepico_fast.train.config import make_config
    from sepico_fast.train.run_checkpoints import atomic_save, prefixed

    syn = tuple(dataset_defaults("synthetic", "synthetic")["crop_size"])
    assert training_crop({"crop": [0, 0], "source": "synthetic", "target": "synthetic"}) == syn
    assert training_crop({"crop": [0, 0], "source": "gta", "target": "cityscapes"}) == \
        tuple(dataset_defaults("gta", "cityscapes")["crop_size"])
    assert training_crop({}) == (640, 640) and training_crop({"crop": [96, 64]}) == (96, 64)
    cfg = make_config({"proj_dim": 16}).to_dict()
    cfg["crop"] = [0, 0]
    model = build_segmentor("dlv2_tiny", 19, 16)
    ckpt = atomic_save({"state_dict": prefixed("model.", model.state_dict()), "meta": {"iter": 0, "config": cfg}},
                       tmp_path / "ckpt.pt")
    result = main(["--checkpoint", str(ckpt), "--max-images", "1", "--sliding"])
    assert result["sliding"] and 0 <= result["miou"] <= 100


def test_cli_builds_the_model_from_the_weights_and_checks_device_and_data_root(tmp_path, monkeypatch):
    """A bare dlv2_tiny state dict with proj_dim 64 (export read it; evaluate built proj_dim
    512 and refused it); --device errors in one line; --split test finds Dark Zurich under
    $SEPICO_FAST_DATA like the datasets do (it looked in ./data)."""
    from sepico_fast.models import build_segmentor

    bare = tmp_path / "bare.pt"
    torch.save(build_segmentor("dlv2_tiny", 19, 64).state_dict(), bare)
    result = main(["--checkpoint", str(bare), "--arch", "dlv2_tiny", "--dataset", "synthetic", "--max-images", "1"])
    assert 0 <= result["miou"] <= 100
    for device, why in (("foo", "expected auto, cpu, cuda or cuda:N"), ("cuda:x", "expected auto")):
        with pytest.raises(SystemExit, match=f"^--device: {why}"):
            main(["--checkpoint", str(bare), "--arch", "dlv2_tiny", "--device", device])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="^--device: CUDA is not available on this machine; use auto or cpu"):
            main(["--checkpoint", str(bare), "--arch", "dlv2_tiny", "--device", "cuda"])
    with pytest.raises(SystemExit, match="^--arch: expected one of"):
        main(["--checkpoint", str(bare), "--arch", "dlv3"])
    monkeypatch.setenv("SEPICO_FAST_DATA", str(tmp_path / "datasets"))
    with pytest.raises(SystemExit, match=f"^--data-root: no images under {tmp_path / 'datasets' / 'dark_zurich'}"):
        main(["--checkpoint", str(bare), "--arch", "dlv2_tiny", "--dataset", "darkzurich", "--split", "test"])
