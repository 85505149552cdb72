"""`python -m sepico_fast.prepare` on tiny fixtures written in the exact upstream formats."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sepico_fast.data import TrainLoader, build_datasets, build_val_set, val_loader
from sepico_fast.data.io import encode_png, read_label
from sepico_fast.data.labels import CITYSCAPES_TRAIN_TO_ID, cityscapes_id_palette
from sepico_fast.prepare import main

H, W = 24, 40


def _img(path: Path, seed: int, size=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)


def _ids(seed: int, size=(H, W)) -> np.ndarray:
    """Cityscapes label ids: road bottom half, building top, a car box, unlabeled (0) and ego (1) bits."""
    ids = np.full(size, 11, np.uint8)                    # building
    ids[size[0] // 2:] = 7                               # road
    ids[size[0] // 2 - 4:size[0] // 2 + 2, 5 + seed:15 + seed] = 26  # car
    ids[0, :3] = 0                                       # unlabeled -> 255
    ids[-1, -3:] = 1                                     # ego vehicle -> 255
    ids[2:4, 30:32] = 24                                 # person
    return ids


def _train_ids(ids: np.ndarray) -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    lut[list(CITYSCAPES_TRAIN_TO_ID)] = np.arange(19)
    return lut[ids]


def make_gta(root: Path, n: int = 3) -> None:
    for i in range(n):
        _img(root / "images" / f"{i + 1:05d}.png", i)
        lbl = root / "labels" / f"{i + 1:05d}.png"
        lbl.parent.mkdir(parents=True, exist_ok=True)
        if i == 0:  # written by our own encoder as an indexed (colour type 3) PNG
            lbl.write_bytes(encode_png(_ids(i), palette=cityscapes_id_palette()))
        else:       # written by PIL in mode "P", as the GTA5 release
            im = Image.frombytes("P", (W, H), _ids(i).tobytes())
            im.putpalette(cityscapes_id_palette())
            im.save(lbl)


SYNTHIA_IDS = {3: 0, 2: 2, 8: 13, 10: 11, 0: 255, 13: 255}


def synthia_label(seed: int) -> np.ndarray:
    """16-bit RGB label: class id in R, instance ids (> 255, so high bytes are set) in G, B = 0."""
    rng = np.random.default_rng(seed)
    cls = np.full((H, W), 2, np.uint16)       # building
    cls[H // 2:] = 3                          # road
    cls[5:9, 10:20] = 8                       # car
    cls[15:20, 30:34] = 10                    # pedestrian
    cls[0, :5] = 0                            # void
    cls[1, :5] = 13                           # unmapped class
    lbl = np.zeros((H, W, 3), np.uint16)
    lbl[..., 0] = cls
    lbl[..., 1] = rng.integers(256, 65535, (H, W))
    return lbl


def make_synthia(root: Path, n: int = 2) -> None:
    for i in range(n):
        _img(root / "RGB" / f"{i:07d}.png", i)
        p = root / "GT" / "LABELS" / f"{i:07d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encode_png(synthia_label(i), filters=[0, 1, 2, 3, 4]))


def make_cityscapes(root: Path) -> None:
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("frankfurt",))):
        for j, city in enumerate(cities):
            stem = f"{city}_{j:06d}_000019"
            _img(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", j, (32, 64))
            p = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_ids(j, (32, 64))).save(p)
            Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(p.with_name(f"{stem}_gtFine_color.png"))


def make_darkzurich(root: Path) -> None:
    seq = "GOPR0356"
    rows = []
    for k, (night, day) in enumerate(((321, 300), (322, 301))):
        n_rel = f"train/night/{seq}/{seq}_frame_{night:06d}"
        d_rel = f"train/day/{seq}_ref/{seq}_frame_{day:06d}"
        _img(root / "rgb_anon" / f"{n_rel}_rgb_anon.png", k, (27, 48))
        _img(root / "rgb_anon" / f"{d_rel}_rgb_anon.png", 10 + k, (27, 48))
        rows.append(f"{n_rel},{d_rel}")
    (root / "corresp" / "train" / "night").mkdir(parents=True)
    (root / "corresp" / "train" / "night" / f"{seq}.csv").write_text("\n".join(rows) + "\n")
    stem = f"{seq}_frame_000324"
    _img(root / "rgb_anon" / "val" / "night" / seq / f"{stem}_rgb_anon.png", 5, (27, 48))
    p = root / "gt" / "val" / "night" / seq / f"{stem}_gt_labelTrainIds.png"
    p.parent.mkdir(parents=True)
    Image.fromarray(_train_ids(_ids(0, (27, 48)))).save(p)


def _run(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args), "--quiet"])
    err = capsys.readouterr().err
    return code, err


def test_gta_palette_labels(tmp_path, capsys):
    make_gta(tmp_path)
    code, err = _run(capsys, "gta", tmp_path, "--workers", "0")
    assert code == 0, err
    for i in range(3):
        out = read_label(tmp_path / "labels" / f"{i + 1:05d}_labelTrainIds.png")
        np.testing.assert_array_equal(out, _train_ids(_ids(i)))
    doc = json.loads((tmp_path / "sample_class_stats.json").read_text())
    entry = doc["files"]["labels/00001_labelTrainIds.png"]
    ref = np.bincount(_train_ids(_ids(0)).ravel(), minlength=256)[:19]
    assert entry["counts"] == ref.tolist() and entry["size"] == [H, W]
    assert len(doc["files"]) == 3 and abs(sum(doc["class_frequencies"]) - 1) < 1e-6


def test_idempotent_rerun(tmp_path, capsys):
    make_gta(tmp_path)
    assert _run(capsys, "gta", tmp_path)[0] == 0
    out = tmp_path / "labels" / "00002_labelTrainIds.png"
    mtime = out.stat().st_mtime_ns
    stats_before = json.loads((tmp_path / "sample_class_stats.json").read_text())
    assert main(["gta", str(tmp_path)]) == 0
    assert "0 converted, 3 up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "sample_class_stats.json").read_text()) == stats_before


def test_synthia_16bit_labels(tmp_path, capsys):
    make_synthia(tmp_path)
    raw = tmp_path / "GT" / "LABELS" / "0000000.png"
    truncated = np.asarray(Image.open(raw))  # what PIL gives: the high bytes only
    assert not np.array_equal(truncated[..., 0], synthia_label(0)[..., 0].astype(np.uint8))
    code, err = _run(capsys, "synthia", tmp_path, "--workers", "0")
    assert code == 0, err
    lut = np.full(65536, 255, np.uint8)
    lut[list(SYNTHIA_IDS)] = list(SYNTHIA_IDS.values())
    for i in range(2):
        out = read_label(tmp_path / "GT" / "LABELS" / f"{i:07d}_labelTrainIds.png")
        np.testing.assert_array_equal(out, lut[synthia_label(i)[..., 0]])
    doc = json.loads((tmp_path / "sample_class_stats.json").read_text())
    counts = doc["files"]["GT/LABELS/0000000_labelTrainIds.png"]["counts"]
    assert counts == np.bincount(lut[synthia_label(0)[..., 0]].ravel(), minlength=256)[:19].tolist()
    assert counts[0] == (H - H // 2) * W - 20 and counts[13] == 40 and counts[11] == 20


def test_cityscapes_names_and_splits(tmp_path, capsys):
    make_cityscapes(tmp_path)
    code, err = _run(capsys, "cityscapes", tmp_path, "--workers", "2")
    assert code == 0, err
    out = tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(read_label(out), _train_ids(_ids(0, (32, 64))))
    files = json.loads((tmp_path / "sample_class_stats.json").read_text())["files"]
    assert "gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png" in files and len(files) == 3


def test_darkzurich_checks_and_pairs(tmp_path, capsys):
    make_darkzurich(tmp_path)
    code, err = _run(capsys, "darkzurich", tmp_path)
    assert code == 0, err
    make_cityscapes(tmp_path / "cs")
    assert _run(capsys, "cityscapes", tmp_path / "cs")[0] == 0
    src, tgt, val = build_datasets("cityscapes", "darkzurich", source_root=tmp_path / "cs", target_root=tmp_path,
                                   source_scale=(64, 32), target_scale=(32, 18), crop_size=(16, 16),
                                   eval_scale=(32, 18), rcs_min_pixels=10, rcs_min_crop_pixels=5)
    assert len(tgt) == 2 and tgt.entries[0].ref.name == "GOPR0356_frame_000300_rgb_anon.png"
    s, t = TrainLoader(src, tgt, 2, seed=0, pipeline="torch").batch(0)
    assert s["img"].shape == (2, 3, 16, 16) and t["img"].shape == t["ref_img"].shape == (2, 3, 18, 32)
    v = next(val_loader(val))
    assert v["gt"].shape == (1, 1, 27, 48) and v["img"].shape == (1, 3, 18, 32)
    only_val = build_val_set("darkzurich", target_root=tmp_path, eval_scale=(32, 18))
    assert torch.equal(next(val_loader(only_val))["img"], v["img"])
    assert v["name"] == "GOPR0356_frame_000324"


def test_gta_and_synthia_to_cityscapes_loaders(tmp_path, capsys):
    make_gta(tmp_path / "gta")
    make_synthia(tmp_path / "synthia")
    make_cityscapes(tmp_path / "cityscapes")
    for name in ("gta", "synthia", "cityscapes"):
        assert _run(capsys, name, tmp_path / name)[0] == 0
    for source in ("gta", "synthia"):
        src, tgt, val = build_datasets(source, "cityscapes", data_root=tmp_path, source_scale=(40, 24),
                                       target_scale=(32, 16), crop_size=(20, 20), eval_scale=(32, 16),
                                       rcs_min_pixels=10, rcs_min_crop_pixels=5)
        s, t = TrainLoader(src, tgt, 2, seed=0, pipeline="torch").batch(3)
        assert s["img"].shape == (2, 3, 20, 20) and s["gt"].shape == (2, 1, 20, 20)
        assert t["img"].shape == (2, 3, 16, 32) and len(val) == 1
        assert set(torch.unique(s["gt"]).tolist()) <= set(range(19)) | {255}


def test_missing_prepare_is_explained(tmp_path):
    make_gta(tmp_path / "gta")
    make_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(FileNotFoundError, match="sepico_fast.prepare gta"):
        build_datasets("gta", "cityscapes", data_root=tmp_path)


def test_corrupt_label_one_line_error(tmp_path):
    make_gta(tmp_path, n=2)
    bad = tmp_path / "labels" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    proc = subprocess.run([sys.executable, "-m", "sepico_fast.prepare", "gta", str(tmp_path), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr


def test_corrupt_16bit_and_bad_train_ids(tmp_path, capsys):
    make_synthia(tmp_path / "s")
    bad = tmp_path / "s" / "GT" / "LABELS" / "0000001.png"
    data = bytearray(bad.read_bytes())
    data[60:80] = b"\x00" * 20  # damage the compressed stream
    bad.write_bytes(bytes(data))
    code, err = _run(capsys, "synthia", tmp_path / "s", "--workers", "0")
    assert code == 1 and str(bad) in err and len(err.strip().splitlines()) == 1
    make_darkzurich(tmp_path / "dz")
    gt = next((tmp_path / "dz" / "gt").rglob("*_gt_labelTrainIds.png"))
    Image.fromarray(np.full((27, 48), 40, np.uint8)).save(gt)
    code, err = _run(capsys, "darkzurich", tmp_path / "dz")
    assert code == 1 and str(gt) in err and "not a train id" in err


def test_wrong_layouts(tmp_path, capsys):
    make_gta(tmp_path / "g")
    (tmp_path / "g" / "labels").rename(tmp_path / "g" / "gt")
    code, err = _run(capsys, "gta", tmp_path / "g")
    assert code == 2 and str(tmp_path / "g" / "labels") in err and "ROOT/labels/*.png" in err
    make_cityscapes(tmp_path / "c")
    code, err = _run(capsys, "cityscapes", tmp_path / "c" / "leftImg8bit")
    assert code == 2 and str(tmp_path / "c" / "leftImg8bit" / "leftImg8bit" / "train") in err
    assert "_gtFine_labelIds.png" in err  # the expected layout is spelled out
    make_darkzurich(tmp_path / "d")
    next((tmp_path / "d" / "rgb_anon" / "train" / "day").rglob("*.png")).unlink()
    code, err = _run(capsys, "darkzurich", tmp_path / "d")
    assert code == 2 and "GOPR0356.csv" in err and "missing image" in err
    code, err = _run(capsys, "synthia", tmp_path / "nowhere")
    assert code == 2 and "nowhere" in err
    assert len(err.strip().splitlines()) == 1


def test_cache_png_gives_identical_batches_and_jpeg_close(tmp_path, capsys):
    make_gta(tmp_path / "gta")
    make_cityscapes(tmp_path / "cityscapes")
    kw = dict(data_root=tmp_path, source_scale=(30, 18), target_scale=(32, 16), crop_size=(12, 12),
              eval_scale=(32, 16), rcs_min_pixels=10, rcs_min_crop_pixels=5)
    for name, scale in (("gta", ("30", "18")), ("cityscapes", ("32", "16"))):
        for fmt in ("png", "jpeg"):
            code, err = _run(capsys, name, tmp_path / name, "--cache", fmt, "--cache-scale", *scale)
            assert code == 0, err
    assert (tmp_path / "gta" / ".sepico_cache" / "png_30x18" / "images" / "00001.png").is_file()
    assert (tmp_path / "gta" / ".sepico_cache" / "jpeg_30x18" / "labels" / "00001_labelTrainIds.png").is_file()
    plain = build_datasets("gta", "cityscapes", **kw)
    png = build_datasets("gta", "cityscapes", cache="png", **kw)
    jpeg = build_datasets("gta", "cityscapes", cache="jpeg", **kw)
    a = TrainLoader(*plain[:2], 2, seed=5, pipeline="torch").batch(2)
    b = TrainLoader(*png[:2], 2, seed=5, pipeline="torch").batch(2)
    c = TrainLoader(*jpeg[:2], 2, seed=5, pipeline="torch").batch(2)
    assert torch.equal(a[0]["img"], b[0]["img"]) and torch.equal(a[0]["gt"], b[0]["gt"])
    assert torch.equal(a[1]["img"], b[1]["img"])
    assert torch.equal(a[0]["gt"], c[0]["gt"]) and (a[0]["img"] - c[0]["img"]).abs().mean() < 0.5
    va, vb = next(val_loader(plain[2])), next(val_loader(png[2]))
    assert torch.equal(va["img"], vb["img"]) and torch.equal(va["gt"], vb["gt"]) and va["gt"].shape[-2:] == (32, 64)
    with pytest.raises(FileNotFoundError, match="--cache"):
        build_datasets("gta", "cityscapes", cache="png", **dict(kw, source_scale=(40, 24)))


# ----------------------------------------------------------------------------- damaged files

def _truncate(path: Path, keep: int = 120) -> None:
    path.write_bytes(path.read_bytes()[:keep])  # the PNG header survives: only a full decode notices


def test_truncated_image_is_found_and_every_bad_file_listed(tmp_path, capsys):
    make_gta(tmp_path, n=3)
    bad_img = tmp_path / "images" / "00001.png"
    bad_lbl = tmp_path / "labels" / "00003.png"
    _truncate(bad_img)
    _truncate(bad_lbl, 60)
    code, err = _run(capsys, "gta", tmp_path, "--workers", "0")
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == "error: 2 bad files:" and len(lines) == 3
    assert str(bad_img) in lines[1] and str(bad_lbl) in lines[2]
    assert not (tmp_path / "sample_class_stats.json").exists()  # nothing marked as done


def test_check_mode_verifies_a_prepared_dataset(tmp_path, capsys):
    make_cityscapes(tmp_path)
    assert _run(capsys, "cityscapes", tmp_path)[0] == 0
    assert main(["cityscapes", str(tmp_path), "--check", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 images and 3 labels" in out and "intact" in out
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    img = tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    lbl = tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    moved = tmp_path / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelTrainIds.png"
    _truncate(img)
    Image.fromarray(np.full((32, 64), 40, np.uint8)).save(lbl)  # not a train id
    arr = read_label(moved)
    arr[:4] = 0
    Image.fromarray(arr).save(moved)  # valid values, other counts than the stats file
    code, err = _run(capsys, "cityscapes", tmp_path, "--check", "--workers", "2")
    lines = err.strip().splitlines()
    assert code == 1 and lines[0] == "error: 3 bad files:"
    assert any(str(img) in x for x in lines) and any(str(lbl) in x and "not a train id" in x for x in lines)
    assert any(str(moved) in x and "class counts differ" in x for x in lines)
    changed = {img, lbl, moved}
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p not in changed)  # --check writes nothing


def test_training_time_bad_label_names_the_file(tmp_path, capsys):
    """A train-id map edited after prepare: one DataFileError naming it, in this process
    and from a DataLoader worker (torch turns the worker's exception into a RuntimeError)."""
    from sepico_fast.data.io import DataFileError

    make_gta(tmp_path / "gta")
    make_cityscapes(tmp_path / "cityscapes")
    for name in ("gta", "cityscapes"):
        assert _run(capsys, name, tmp_path / name)[0] == 0
    bad = tmp_path / "gta" / "labels" / "00002_labelTrainIds.png"
    Image.fromarray(np.full((H, W), 77, np.uint8)).save(bad)
    src, tgt, _ = build_datasets("gta", "cityscapes", data_root=tmp_path, source_scale=(40, 24),
                                 target_scale=(32, 16), crop_size=(16, 16), eval_scale=(32, 16), rcs=False)
    src.entries = [src.entries[1]]  # only the bad file
    with pytest.raises(DataFileError, match="00002_labelTrainIds.png: value 77 is not a train id"):
        TrainLoader(src, tgt, 1, seed=0, pipeline="torch").batch(0)
    loader = TrainLoader(src, tgt, 1, seed=0, pipeline="torch", num_workers=1, num_iters=2)
    with pytest.raises(DataFileError) as exc:
        next(iter(loader))
    assert exc.value.path == str(bad) and "value 77" in exc.value.reason and "\n" not in str(exc.value)
