"""Benchmark-server submissions: each format (names, encoding, sizes, zip contents) written by
`evaluate --format` and round-tripped through `sepico_fast.submission`'s check, on fixtures
in the real layouts; the check's one-line verdicts on broken submissions."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sepico_fast.data.labels import CITYSCAPES_TRAIN_TO_ID
from sepico_fast.evaluate import main as evaluate_main
from sepico_fast.prepare import main as prepare_main
from sepico_fast.submission import (
    CONFIDENCE_SCALE,
    SubmissionWriter,
    prediction_name,
    train_id_to_label_id_lut,
    validate,
)
from sepico_fast.submission import main as check_main
from tests.test_acdc import ACDC_HW, make_acdc
from tests.test_prepare import _img, make_cityscapes, make_darkzurich

# The published Cityscapes label definitions (cityscapesscripts labels.py): label id of each
# evaluated class, in train-id order road .. bicycle.
OFFICIAL_LABEL_IDS = {"road": 7, "sidewalk": 8, "building": 11, "wall": 12, "fence": 13, "pole": 17,
                      "traffic light": 19, "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23,
                      "person": 24, "rider": 25, "car": 26, "truck": 27, "bus": 28, "train": 31,
                      "motorcycle": 32, "bicycle": 33}
CS_HW = (32, 64)


def test_train_id_to_label_id_is_the_official_table():
    from sepico_fast.data.labels import CLASSES

    lut = train_id_to_label_id_lut()
    assert [int(lut[t]) for t in range(19)] == [OFFICIAL_LABEL_IDS[c] for c in CLASSES]
    assert tuple(CITYSCAPES_TRAIN_TO_ID) == tuple(OFFICIAL_LABEL_IDS.values())
    assert lut[255] == 0  # ignore -> unlabeled


def test_file_names_per_format():
    assert prediction_name("trainids", "aachen_000000_000019_leftImg8bit.png") == "aachen_000000_000019.png"
    assert prediction_name("trainids", "GOPR0356_frame_000324") == "GOPR0356_frame_000324.png"
    cs = "berlin_000000_000019_leftImg8bit.png"
    assert prediction_name("cityscapes", "berlin_000000_000019", cs) == cs
    dz = "GOPR0364_frame_000001_rgb_anon.png"
    assert prediction_name("darkzurich", dz, dz) == dz and prediction_name("acdc", "GOPR0364_frame_000001", dz) == dz


# ----------------------------------------------------------------------------------------
# fixtures: the dataset trees, with the unlabelled test splits
# ----------------------------------------------------------------------------------------
def _cs_test(root: Path) -> list[str]:
    names = []
    for j, city in enumerate(("berlin", "bielefeld")):
        name = f"{city}_{j:06d}_000019_leftImg8bit.png"
        _img(root / "leftImg8bit" / "test" / city / name, 20 + j, CS_HW)
        names.append(name)
    return names


def _dz_test(root: Path) -> list[str]:
    names = []
    for k, seq in enumerate(("GOPR0364", "GOPR0594")):
        name = f"{seq}_frame_{k + 1:06d}_rgb_anon.png"
        _img(root / "rgb_anon" / "test" / "night" / seq / name, 30 + k, (27, 48))
        names.append(name)
    return names


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cityscapes(root / "cityscapes")
    make_darkzurich(root / "dark_zurich")
    make_acdc(root / "acdc")
    names = {"cityscapes": _cs_test(root / "cityscapes"), "darkzurich": _dz_test(root / "dark_zurich"),
             "acdc": sorted(p.name for p in (root / "acdc" / "rgb_anon").glob("*/test/*/*_rgb_anon.png"))}
    for ds, folder in (("cityscapes", "cityscapes"), ("darkzurich", "dark_zurich"), ("acdc", "acdc")):
        assert prepare_main([ds, str(root / folder), "--quiet"]) == 0
    return root, names


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from sepico_fast.models import build_segmentor
    from sepico_fast.train.config import make_config
    from sepico_fast.train.run_checkpoints import atomic_save, prefixed

    cfg = make_config({"proj_dim": 16, "source": "cityscapes", "target": "cityscapes", "arch": "dlv2_tiny"})
    torch.manual_seed(0)
    model = build_segmentor(cfg.arch, 19, 16)
    state = {"state_dict": prefixed("model.", model.state_dict()), "meta": {"iter": 0, "config": cfg.to_dict()}}
    return atomic_save(state, tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


@pytest.fixture
def small_eval(monkeypatch):
    from sepico_fast.data import datasets

    for ds, scale in (("cityscapes", (64, 32)), ("darkzurich", (64, 36)), ("acdc", (64, 36))):
        monkeypatch.setitem(datasets.EVAL_SCALES, ds, scale)


def _evaluate(ckpt, root, out, fmt, dataset, split="test", *extra):
    return evaluate_main(["--checkpoint", str(ckpt), "--data-root", str(root), "--dataset", dataset,
                          "--split", split, "--format", fmt, "--out", str(out), *extra])


def _zip_pngs(archive: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(archive) as zf:
        return {n: np.array(Image.open(zf.open(n))) for n in zf.namelist()}


# ----------------------------------------------------------------------------------------
# each format written by evaluate and checked
# ----------------------------------------------------------------------------------------
def test_cityscapes_test_server_format(data, ckpt, small_eval, tmp_path, capsys):
    root, names = data[0], data[1]["cityscapes"]
    out = tmp_path / "cs"
    result = _evaluate(ckpt, root, out, "cityscapes", "cityscapes")
    line = capsys.readouterr().out
    assert result["submission_check"]["ok"] and "OK: cityscapes submission" in line
    files = _zip_pngs(out / "cityscapes_submission.zip")
    assert sorted(files) == sorted(f"labelIds/{n}" for n in names)  # named after each *_leftImg8bit.png
    official = set(OFFICIAL_LABEL_IDS.values())
    for arr in files.values():
        assert arr.shape == CS_HW and arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= official
    # the same prediction in train ids maps through the official table
    trainids = tmp_path / "tid"
    _evaluate(ckpt, root, trainids, "trainids", "cityscapes")
    lut = train_id_to_label_id_lut()
    for n in names:
        tid = np.array(Image.open(trainids / "labelTrainIds" / n.replace("_leftImg8bit", "")))
        assert np.array_equal(lut[tid], files[f"labelIds/{n}"])
    assert json.loads((out / "metrics.json").read_text())["format"] == "cityscapes"
    assert check_main([str(out), "--format", "cityscapes", "--split-root", str(root / "cityscapes")]) == 0


def test_acdc_test_and_val_format(data, ckpt, small_eval, tmp_path, capsys):
    root, names = data[0], data[1]["acdc"]
    out = tmp_path / "acdc"
    result = _evaluate(ckpt, root, out, "acdc", "acdc")
    assert result["submission_check"]["ok"], result["submission_check"]["line"]
    assert result["dz_test_reweight"]["enabled"] is False  # ACDC is never re-weighted
    files = _zip_pngs(out / "acdc_submission.zip")
    assert sorted(files) == sorted(f"labelTrainIds/{n}" for n in names) and len(names) == 4  # four conditions
    for arr in files.values():
        assert arr.shape == ACDC_HW and arr.dtype == np.uint8 and arr.max() < 19
    # val: the same format, checked against the labelled images, plus per-condition mIoU
    val = _evaluate(ckpt, root, tmp_path / "acdc_val", "acdc", "acdc", "val")
    assert val["submission_check"]["ok"] and list(val["per_condition"]) == ["fog", "night", "rain", "snow"]
    capsys.readouterr()
    assert check_main([str(out / "acdc_submission.zip"), "--format", "acdc", "--split-root", str(root / "acdc")]) == 0


def test_dark_zurich_three_folders_and_confidence(data, ckpt, small_eval, tmp_path, capsys):
    root, names = data[0], data[1]["darkzurich"]
    out = tmp_path / "dz"
    result = _evaluate(ckpt, root, out, "darkzurich", "darkzurich")
    assert result["submission_check"]["ok"], result["submission_check"]["line"]
    files = _zip_pngs(out / "darkzurich_submission.zip")
    assert sorted(files) == sorted(f"{f}/{n}" for f in ("labelTrainIds", "confidence", "labelTrainIds_invalid")
                                   for n in names)
    for n in names:
        pred, conf = files[f"labelTrainIds/{n}"], files[f"confidence/{n}"]
        assert pred.shape == conf.shape == (27, 48) and pred.dtype == np.uint8
        assert conf.dtype in (np.uint16, np.int32) and 0 < conf.min() and conf.max() <= CONFIDENCE_SCALE
        assert np.array_equal(files[f"labelTrainIds_invalid/{n}"], pred)  # no invalid pixels by default
        with zipfile.ZipFile(out / "darkzurich_submission.zip") as zf:
            assert Image.open(zf.open(f"confidence/{n}")).mode.startswith("I")  # a 16-bit PNG
    # the same predictions as the default trainids output (which keeps the test names)
    plain = tmp_path / "plain"
    evaluate_main(["--checkpoint", str(ckpt), "--data-root", str(root), "--dataset", "darkzurich", "--split", "test",
                   "--out", str(plain)])
    for n in names:
        assert np.array_equal(np.array(Image.open(plain / "labelTrainIds" / n)), files[f"labelTrainIds/{n}"])
    # --dz-invalid-below marks the least confident pixels 255
    strict = tmp_path / "strict"
    _evaluate(ckpt, root, strict, "darkzurich", "darkzurich", "test", "--dz-invalid-below", "1.0")
    inv = np.array(Image.open(strict / "labelTrainIds_invalid" / names[0]))
    assert (inv == 255).all()
    capsys.readouterr()


def test_confidence_is_the_probability_of_the_predicted_class(tmp_path):
    """Independent check of the confidence map on a writer fed by evaluate_model."""
    from sepico_fast.evaluate import evaluate_model

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.randn(1, 19, 4, 6, generator=torch.Generator().manual_seed(3)))

        def predict(self, img):
            return self.logits

    writer = SubmissionWriter(tmp_path, "darkzurich")
    batch = {"img": torch.zeros(1, 3, 4, 6), "name": "a_rgb_anon.png", "file": "a_rgb_anon.png", "orig_hw": (4, 6)}
    evaluate_model(Fixed(), [batch], 19, writer=writer)
    prob = torch.softmax(Fixed().logits.detach(), 1)[0]
    want = np.rint(prob.max(0).values.numpy().astype(np.float64) * 65535).astype(np.uint16)
    got = np.array(Image.open(tmp_path / "confidence" / "a_rgb_anon.png"))
    assert np.abs(got.astype(np.int64) - want).max() <= 1  # float32 rounding
    assert np.array_equal(np.array(Image.open(tmp_path / "labelTrainIds" / "a_rgb_anon.png")),
                          prob.argmax(0).numpy().astype(np.uint8))


# ----------------------------------------------------------------------------------------
# the check on broken submissions: one line naming what is missing or wrong
# ----------------------------------------------------------------------------------------
def _write_all(out: Path, fmt: str, names: list[str], hw, rng) -> SubmissionWriter:
    writer = SubmissionWriter(out, fmt)
    for n in names:
        pred = rng.integers(0, 19, hw)
        writer.write({"name": n, "file": n}, pred, rng.random(hw) if writer.needs_confidence else None)
    writer.finish()
    return writer


@pytest.mark.parametrize("fmt, dataset, folder", [("cityscapes", "cityscapes", "cityscapes"),
                                                  ("acdc", "acdc", "acdc"), ("darkzurich", "darkzurich", "dark_zurich")])
def test_check_names_what_is_wrong(data, tmp_path, capsys, fmt, dataset, folder):
    root, names = data
    hw = {"cityscapes": CS_HW, "acdc": ACDC_HW, "darkzurich": (27, 48)}[dataset]
    rng = np.random.default_rng(0)
    out = tmp_path / "ok"
    writer = _write_all(out, fmt, names[dataset], hw, rng)
    split_root = root / folder
    ok, line = validate(out, fmt, split_root)
    assert ok and line.startswith("OK:") and f"{hw[1]}x{hw[0]}" in line
    label = writer.layout.label_folder
    # a missing prediction
    missing = out / label / names[dataset][0]
    missing.unlink()
    ok, line = validate(out, fmt, split_root)
    assert not ok and "\n" not in line and f"1 missing (e.g. {label}/{names[dataset][0]})" in line
    assert check_main([str(out), "--format", fmt, "--split-root", str(split_root)]) == 1
    assert capsys.readouterr().out.startswith("INVALID:")
    # wrong size, wrong values, a stray file
    Image.fromarray(np.zeros((hw[0] // 2, hw[1] // 2), np.uint8)).save(missing)
    ok, line = validate(out, fmt, split_root)
    assert not ok and f"1 wrong size (e.g. {label}/{names[dataset][0]} is {hw[1] // 2}x{hw[0] // 2}" in line
    Image.fromarray(np.full(hw, 19 if fmt != "cityscapes" else 3, np.uint8)).save(missing)
    ok, line = validate(out, fmt, split_root)
    assert not ok and "1 bad values" in line
    Image.fromarray(np.zeros(hw, np.uint8)).save(out / label / "stray_frame_000000.png")
    ok, line = validate(out, fmt, split_root)
    assert "1 unexpected (e.g. " in line and "stray_frame_000000.png" in line
    # the zip written before the damage still passes
    ok, _ = validate(out / writer.layout.zip_name, fmt, split_root)
    assert ok


def test_check_confidence_bit_depth_and_arguments(data, tmp_path, capsys):
    root, names = data
    out = tmp_path / "dz"
    _write_all(out, "darkzurich", names["darkzurich"], (27, 48), np.random.default_rng(1))
    Image.fromarray(np.zeros((27, 48), np.uint8)).save(out / "confidence" / names["darkzurich"][1])
    ok, line = validate(out, "darkzurich", root / "dark_zurich")
    assert not ok and "1 wrong bit depth (e.g. confidence/" in line and "16-bit" in line
    # bad arguments: exit 2, one line
    assert check_main([str(tmp_path / "nope"), "--format", "acdc", "--split-root", str(root / "acdc")]) == 2
    assert check_main([str(out), "--format", "acdc", "--split-root", str(tmp_path)]) == 2
    assert check_main([str(out), "--format", "trainids", "--split-root", str(root / "acdc")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert err[1].startswith("error: --split-root: acdc: ") and "--dataset" in err[2]


def test_trainids_check_on_val_and_evaluate_refuses_mismatches(data, ckpt, small_eval, tmp_path, capsys):
    root, _ = data
    out = tmp_path / "val"
    evaluate_main(["--checkpoint", str(ckpt), "--data-root", str(root), "--dataset", "darkzurich", "--out", str(out)])
    ok, line = validate(out, "trainids", root / "dark_zurich", "val", dataset="darkzurich")
    assert ok, line
    assert zipfile.ZipFile(out / "labelTrainIds.zip").namelist() == ["labelTrainIds/GOPR0356_frame_000324.png"]
    with pytest.raises(SystemExit, match="^--format acdc: predictions of acdc images, got --dataset cityscapes"):
        _evaluate(ckpt, root, tmp_path / "x", "acdc", "cityscapes")
    with pytest.raises(SystemExit, match="^--format cityscapes: needs --out"):
        evaluate_main(["--checkpoint", str(ckpt), "--dataset", "cityscapes", "--format", "cityscapes"])
    with pytest.raises(SystemExit, match="^--data-root: "):
        _evaluate(ckpt, tmp_path, tmp_path / "y", "acdc", "acdc")
    capsys.readouterr()
