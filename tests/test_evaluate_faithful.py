"""Evaluation as the authors' code does it (method §7), each against a formulation written here:

* two resizes: logits to the network input size, then to the label size;
* Dark Zurich test-time class re-weighting (softmax at the input size × log-frequency
  weights with scale 0.16, then resize and arg-max) on ``*_rgb_anon.png`` images only,
  in ``evaluate_model``, the CLI (table, metrics.json, test-server zip) and the validation
  during training; a switch turns it off.
"""
from __future__ import annotations

import json
import math
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sepico_fast.evaluate import dark_zurich_class_weights, evaluate_model, is_dark_zurich_image, main

# method §7: Cityscapes class frequencies behind the Dark Zurich weights.
FREQ = (0.36869696, 0.06084986, 0.22824049, 0.00655399, 0.00877272, 0.01227341, 0.00207795, 0.0055127,
        0.15928651, 0.01157818, 0.04018982, 0.01218957, 0.00135122, 0.06994545, 0.00267456, 0.00235192,
        0.00232904, 0.00098658, 0.00413907)


def spec_weights(scale: float) -> torch.Tensor:
    """w_c = (mean(l) - l_c) / std(l) * scale + 1, l = log f, std with the n - 1 divisor."""
    logs = [math.log(f) for f in FREQ]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((v - mean) ** 2 for v in logs) / (len(logs) - 1))
    return torch.tensor([(mean - v) / std * scale + 1 for v in logs], dtype=torch.float64)


def confusion(pred: torch.Tensor, gt: torch.Tensor, c: int) -> torch.Tensor:
    keep = gt != 255
    return torch.bincount(gt[keep] * c + pred[keep], minlength=c * c).view(c, c)


class FixedLogits(torch.nn.Module):
    """predict() returns fixed logits at 1/4 of the input size, like a stride-4 decoder."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def predict(self, img):
        self.seen.append(tuple(img.shape[-2:]))
        assert tuple(img.shape[-2:]) == (4 * self.logits.shape[-2], 4 * self.logits.shape[-1])
        return self.logits + self.p


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_weights_formula_and_shared_with_training():
    from sepico_fast.train.uda import log_frequency_class_weights

    for scale in (0.16, 0.05, 1.0):
        torch.testing.assert_close(dark_zurich_class_weights(scale).double(), spec_weights(scale), rtol=1e-6, atol=1e-6)
    assert dark_zurich_class_weights().dtype == torch.float32
    torch.testing.assert_close(dark_zurich_class_weights(), spec_weights(0.16).float())  # default: test time
    torch.testing.assert_close(log_frequency_class_weights(), spec_weights(0.05).float())  # training time
    with pytest.raises(ValueError, match="freq"):
        log_frequency_class_weights(freq=(0.5, 0.0))


def test_two_step_resize_whole_and_sliding():
    """Logits [1,C,6,10] of a 24x40 input, label 37x61: up to 24x40 first, then to 37x61
    (not straight to 37x61, which differs on some pixels)."""
    g = torch.Generator().manual_seed(0)
    c = 5
    logits = torch.randn(1, c, 6, 10, generator=g)
    gt = torch.randint(0, c, (1, 1, 37, 61), generator=g)
    gt[0, 0, :3] = 255
    batch = {"img": torch.zeros(1, 3, 24, 40), "gt": gt, "name": "a", "file": "a_leftImg8bit.png"}
    want = _up(_up(logits, (24, 40)), (37, 61)).argmax(1)
    one_step = _up(logits, (37, 61)).argmax(1)
    assert (want != one_step).any()  # the test can tell the two apart
    cm = evaluate_model(FixedLogits(logits), [batch], c)
    assert torch.equal(cm.state, confusion(want[0], gt[0, 0], c))
    # sliding with a window as large as the image is the same two-step whole inference
    cm_slide = evaluate_model(FixedLogits(logits), [batch], c, sliding=True, crop=(24, 40))
    assert torch.equal(cm_slide.state, cm.state)


def test_dark_zurich_reweighting_only_on_rgb_anon_images():
    g = torch.Generator().manual_seed(1)
    logits = 0.3 * torch.randn(1, 19, 5, 8, generator=g)  # near-uniform: the weights change predictions
    gt = torch.randint(0, 19, (1, 1, 27, 48), generator=g)
    w = spec_weights(0.16).float().view(1, -1, 1, 1)
    want_dz = _up(torch.softmax(_up(logits, (20, 32)), 1) * w, (27, 48)).argmax(1)
    want_plain = _up(_up(logits, (20, 32)), (27, 48)).argmax(1)
    assert (want_dz != want_plain).float().mean() > 0.05

    def run(file, weight):
        report = {}
        batch = {"img": torch.zeros(1, 3, 20, 32), "gt": gt, "name": "x", "file": file}
        cm = evaluate_model(FixedLogits(logits), [batch], 19, test_class_weight=weight, report=report)
        return cm.state, report

    dz = "GOPR0356_frame_000324_rgb_anon.png"
    state, report = run(dz, dark_zurich_class_weights())
    assert torch.equal(state, confusion(want_dz[0], gt[0, 0], 19))
    assert report == {"images": 1, "reweighted_images": 1}
    state, report = run(dz, None)  # switched off
    assert torch.equal(state, confusion(want_plain[0], gt[0, 0], 19)) and report["reweighted_images"] == 0
    state, report = run("frankfurt_000000_000294_leftImg8bit.png", dark_zurich_class_weights())  # not Dark Zurich
    assert torch.equal(state, confusion(want_plain[0], gt[0, 0], 19)) and report["reweighted_images"] == 0
    assert is_dark_zurich_image("x/GOPR0356_frame_000324_rgb_anon.jpg")  # cached copy
    with pytest.raises(ValueError, match="test_class_weight: expected 19 class weights, got 5"):
        run(dz, torch.ones(5))
    assert not is_dark_zurich_image("GOPR0356_frame_000324") and not is_dark_zurich_image(None)


def _dz_root(tmp_path):
    from sepico_fast.prepare import main as prepare_main
    from tests.test_prepare import _img, make_darkzurich

    root = tmp_path / "data"
    make_darkzurich(root / "dark_zurich")
    _img(root / "dark_zurich" / "rgb_anon" / "test" / "night" / "GOPR0364" / "GOPR0364_frame_000001_rgb_anon.png",
         7, (27, 48))
    assert prepare_main(["darkzurich", str(root / "dark_zurich"), "--quiet"]) == 0
    return root


def _checkpoint(tmp_path):
    from sepico_fast.models import build_segmentor
    from sepico_fast.train.config import make_config
    from sepico_fast.train.run_checkpoints import atomic_save, prefixed

    cfg = make_config({"proj_dim": 16, "source": "cityscapes", "target": "darkzurich", "arch": "dlv2_tiny"})
    torch.manual_seed(0)
    model = build_segmentor(cfg.arch, 19, 16)
    state = {"state_dict": prefixed("model.", model.state_dict()), "meta": {"iter": 0, "config": cfg.to_dict()}}
    path = atomic_save(state, tmp_path / "ckpt.pt")
    return path, model.eval()


def test_cli_dark_zurich_val_and_test_zip(tmp_path, capsys, monkeypatch):
    """Dark Zurich evaluates at 1280x720 (the 27x48 fixture fits it as 720x1280); predictions
    are re-weighted by default and equal the formulation here; --no-dz-test-reweight gives the
    plain arg-max; the table and metrics.json say which; the test split's zip is re-weighted too.
    (The CLI runs below use a 96x54 eval scale to keep the CPU test short.)"""
    from sepico_fast.data import build_val_set
    from sepico_fast.data.datasets import EVAL_SCALES

    root = _dz_root(tmp_path)
    ckpt, model = _checkpoint(tmp_path)
    assert build_val_set("darkzurich", root).resized_size(0) == (720, 1280)
    monkeypatch.setitem(EVAL_SCALES, "darkzurich", (96, 54))
    sample = build_val_set("darkzurich", root)[0]
    assert sample["img"].shape[-2:] == (54, 96) and sample["file"].endswith("_rgb_anon.png")
    with torch.no_grad():
        logits = _up(model.predict(sample["img"]), (54, 96))
    w = spec_weights(0.16).float().view(1, -1, 1, 1)
    want = {True: _up(torch.softmax(logits, 1) * w, (27, 48)).argmax(1)[0].numpy().astype(np.uint8),
            False: _up(logits, (27, 48)).argmax(1)[0].numpy().astype(np.uint8)}
    assert (want[True] != want[False]).any()
    for on in (True, False):
        out = tmp_path / f"val_{on}"
        args = ["--checkpoint", str(ckpt), "--data-root", str(root), "--out", str(out)]
        result = main(args + ([] if on else ["--no-dz-test-reweight"]))
        printed = capsys.readouterr().out
        assert result["dataset"] == "darkzurich"
        rec = json.loads((out / "metrics.json").read_text())["dz_test_reweight"]
        assert rec == {"enabled": on, "scale": 0.16 if on else None, "reweighted_images": int(on), "images": 1}
        assert ("re-weighting: on (" in printed) == on and ("re-weighting: off" in printed) == (not on)
        png = np.array(Image.open(out / "labelTrainIds" / "GOPR0356_frame_000324.png"))
        assert np.array_equal(png, want[on])
    out = tmp_path / "test"
    result = main(["--checkpoint", str(ckpt), "--data-root", str(root), "--split", "test", "--out", str(out)])
    assert result["dz_test_reweight"]["reweighted_images"] == 1
    assert zipfile.ZipFile(out / "labelTrainIds.zip").namelist() == ["labelTrainIds/GOPR0364_frame_000001_rgb_anon.png"]


def test_validation_during_training_reweights_dark_zurich(tmp_path, capsys):
    """runner._evaluate passes the weights (switch: TrainConfig.dz_test_reweight) and records it."""
    from sepico_fast.data import build_val_set
    from sepico_fast.train.config import make_config, parse_args
    from sepico_fast.train.runner import _evaluate

    assert make_config({}).dz_test_reweight and not parse_args(["--no-dz-test-reweight"]).dz_test_reweight
    with pytest.raises(ValueError, match="--num-classes"):
        make_config({"source": "cityscapes", "target": "darkzurich", "num_classes": 12})

    root = _dz_root(tmp_path)
    _, model = _checkpoint(tmp_path)
    val = build_val_set("darkzurich", root, eval_scale=(64, 36))
    writes = []
    results = {}
    for on in (True, False):
        cfg = make_config({"proj_dim": 16, "source": "cityscapes", "target": "darkzurich", "dz_test_reweight": on})
        run = SimpleNamespace(main=True, cfg=cfg, ctx=SimpleNamespace(student=model, amp_dtype=None, pseudo_diag=None),
                              val_target=val, work_dir=tmp_path,
                              device=torch.device("cpu"), writer=SimpleNamespace(write=lambda it, d: writes.append(d)))
        results[on] = _evaluate(run, 10)
        assert results[on]["dz_test_reweight"]["enabled"] is on
        assert results[on]["dz_test_reweight"]["reweighted_images"] == int(on)
        assert ("re-weighting: on (" in capsys.readouterr().out) == on
    sample = val[0]
    with torch.no_grad():
        logits = _up(model.predict(sample["img"]), (36, 64))
    gt = sample["gt"][0, 0]
    for on, scores in ((True, torch.softmax(logits, 1) * spec_weights(0.16).float().view(1, -1, 1, 1)),
                       (False, logits)):
        from sepico_fast.metrics import ConfusionMatrix

        cm = ConfusionMatrix(19)
        cm.state += confusion(_up(scores, tuple(gt.shape)).argmax(1)[0], gt, 19)
        assert results[on]["miou"] == pytest.approx(100 * float(cm.miou()))
    assert len(writes) == 2
