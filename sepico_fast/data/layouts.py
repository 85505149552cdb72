"""The official on-disk layouts of the four datasets (method §1) and their file listings.

Each ``*_files`` function returns one :class:`Entry` per sample, sorted by name, and
raises :class:`LayoutError` (a ``ValueError``) naming the missing folder and the layout
it expected. ``raw_label`` is the label as distributed, ``label`` the 8-bit train-id map
that ``python -m sepico_fast.prepare`` writes next to it.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("gta", "synthia", "cityscapes", "darkzurich", "acdc")

# ACDC's four adverse conditions (folder names under rgb_anon/ and gt/).
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")

LAYOUTS = {
    "gta": "ROOT/images/*.png and ROOT/labels/*.png (palette PNGs of Cityscapes label ids, same file names)",
    "synthia": "ROOT/RGB/*.png and ROOT/GT/LABELS/*.png (16-bit PNGs, class id in R; SYNTHIA RAND_CITYSCAPES)",
    "cityscapes": "ROOT/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                  "ROOT/gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
    "darkzurich": "ROOT/rgb_anon/{train,val}/{night,day}/<seq>/*_rgb_anon.png, "
                  "ROOT/gt/val/night/<seq>/*_gt_labelTrainIds.png and ROOT/corresp/train/night/*.csv",
    "acdc": "ROOT/rgb_anon/{fog,night,rain,snow}/{train,val,test}/<seq>/*_rgb_anon.png and "
            "ROOT/gt/{fog,night,rain,snow}/{train,val}/<seq>/*_gt_labelTrainIds.png",
}


# Training resize scales (long side, short side) of each dataset (method §1). Dark Zurich
# (1920x1080) fits 1280x720 for training and evaluation, its day references too (the
# authors' Dark Zurich configs). ACDC (1920x1080) fits 960x540, the scale of the DAFormer
# family's Cityscapes -> ACDC configs (docs/data.md).
TRAIN_SCALES = {"gta": (1280, 720), "synthia": (1280, 760), "cityscapes": (1280, 640), "darkzurich": (1280, 720),
                "acdc": (960, 540)}


class LayoutError(ValueError):
    """A dataset folder that does not have the expected layout."""


@dataclass(frozen=True)
class Entry:
    image: Path
    raw_label: Path | None = None  # label file as distributed (None: unlabelled)
    label: Path | None = None      # 8-bit train-id label written by prepare
    name: str = ""
    ref: Path | None = None        # Dark Zurich: day reference image of a night frame


def _need_dir(dataset: str, path: Path) -> Path:
    if not path.is_dir():
        raise LayoutError(f"{dataset}: folder {path} not found; expected layout {LAYOUTS[dataset]}")
    return path


def _pngs(folder: Path, suffix: str = ".png", recursive: bool = False) -> list[Path]:
    pattern = f"**/*{suffix}" if recursive else f"*{suffix}"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


def _train_id_path(raw: Path) -> Path:
    return raw.with_name(raw.stem + "_labelTrainIds.png")


def _flat_pairs(dataset: str, root: Path, image_dir: str, label_dir: str) -> list[Entry]:
    images = _need_dir(dataset, root / image_dir)
    labels = _need_dir(dataset, root / label_dir)
    files = _pngs(images)
    if not files:
        raise LayoutError(f"{dataset}: no *.png images in {images}; expected layout {LAYOUTS[dataset]}")
    out = []
    for img in files:
        raw = labels / img.name
        if not raw.is_file():
            raise LayoutError(f"{dataset}: image {img} has no label {raw}; expected layout {LAYOUTS[dataset]}")
        out.append(Entry(img, raw, _train_id_path(raw), img.stem))
    return out


def gta_files(root: str | os.PathLike) -> list[Entry]:
    return _flat_pairs("gta", Path(root), "images", "labels")


def synthia_files(root: str | os.PathLike) -> list[Entry]:
    return _flat_pairs("synthia", Path(root), "RGB", "GT/LABELS")


def cityscapes_files(root: str | os.PathLike, split: str) -> list[Entry]:
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    root = Path(root)
    images = _need_dir("cityscapes", root / "leftImg8bit" / split)
    labels = _need_dir("cityscapes", root / "gtFine" / split)
    out = []
    for img in _pngs(images, "_leftImg8bit.png", recursive=True):
        stem = img.name[:-len("_leftImg8bit.png")]
        city = img.parent.relative_to(images)
        raw = labels / city / f"{stem}_gtFine_labelIds.png"
        if not raw.is_file():
            raise LayoutError(f"cityscapes: image {img} has no label {raw}; expected layout {LAYOUTS['cityscapes']}")
        out.append(Entry(img, raw, raw.with_name(f"{stem}_gtFine_labelTrainIds.png"), stem))
    if not out:
        raise LayoutError(f"cityscapes: no *_leftImg8bit.png under {images}; expected layout {LAYOUTS['cityscapes']}")
    return out


def _dz_image(root: Path, rel: str) -> Path:
    rel = rel.strip().lstrip("/")
    if rel.endswith(".png"):
        return root / "rgb_anon" / rel
    return root / "rgb_anon" / f"{rel}_rgb_anon.png"


def darkzurich_pairs(root: str | os.PathLike) -> list[tuple[Path, Path, Path]]:
    """(csv file, night image, day image) for every row of ``corresp/train/night/*.csv``."""
    root = Path(root)
    corresp = _need_dir("darkzurich", root / "corresp" / "train" / "night")
    tables = _pngs(corresp, ".csv")
    if not tables:
        raise LayoutError(f"darkzurich: no *.csv in {corresp}; expected layout {LAYOUTS['darkzurich']}")
    pairs = []
    for table in tables:
        with open(table, newline="") as fh:
            for row in csv.reader(fh):
                cells = [c.strip() for c in row if c.strip()]
                if len(cells) < 2 or "/" not in cells[0]:
                    continue  # header or blank line
                pairs.append((table, _dz_image(root, cells[0]), _dz_image(root, cells[1])))
    return pairs


def darkzurich_files(root: str | os.PathLike, split: str) -> list[Entry]:
    """train: night frames of the correspondence tables with their day reference; val: labelled night frames."""
    root = Path(root)
    if split == "train":
        _need_dir("darkzurich", root / "rgb_anon" / "train" / "night")
        out = []
        for table, night, day in darkzurich_pairs(root):
            for p in (night, day):
                if not p.is_file():
                    raise LayoutError(f"darkzurich: {table} refers to missing image {p}")
            out.append(Entry(night, None, None, night.name[:-len("_rgb_anon.png")], ref=day))
        if not out:
            raise LayoutError(f"darkzurich: the csv files in {root / 'corresp/train/night'} list no pairs")
        return sorted(out, key=lambda e: str(e.image))
    if split != "val":
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    images = _need_dir("darkzurich", root / "rgb_anon" / "val" / "night")
    labels = _need_dir("darkzurich", root / "gt" / "val" / "night")
    out = []
    for img in _pngs(images, "_rgb_anon.png", recursive=True):
        stem = img.name[:-len("_rgb_anon.png")]
        lbl = labels / img.parent.relative_to(images) / f"{stem}_gt_labelTrainIds.png"
        if not lbl.is_file():
            raise LayoutError(f"darkzurich: image {img} has no label {lbl}; expected layout {LAYOUTS['darkzurich']}")
        out.append(Entry(img, lbl, lbl, stem))
    if not out:
        raise LayoutError(f"darkzurich: no *_rgb_anon.png under {images}; expected layout {LAYOUTS['darkzurich']}")
    return out


def acdc_files(root: str | os.PathLike, split: str) -> list[Entry]:
    """Images of every condition folder present (fog, night, rain, snow) for ``split`` with
    their ``*_gt_labelTrainIds.png`` (train, val); ``test`` has no labels. Names are the
    image stems without ``_rgb_anon``; ``acdc_condition`` tells an entry's condition."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")
    root = Path(root)
    _need_dir("acdc", root / "rgb_anon")
    conditions = [c for c in ACDC_CONDITIONS if (root / "rgb_anon" / c / split).is_dir()]
    if not conditions:
        raise LayoutError(f"acdc: no condition folder rgb_anon/{{{','.join(ACDC_CONDITIONS)}}}/{split} under {root}; "
                          f"expected layout {LAYOUTS['acdc']}")
    out = []
    for cond in conditions:
        images = root / "rgb_anon" / cond / split
        labels = None if split == "test" else _need_dir("acdc", root / "gt" / cond / split)
        for img in _pngs(images, "_rgb_anon.png", recursive=True):
            stem = img.name[:-len("_rgb_anon.png")]
            if labels is None:
                out.append(Entry(img, None, None, stem))
                continue
            lbl = labels / img.parent.relative_to(images) / f"{stem}_gt_labelTrainIds.png"
            if not lbl.is_file():
                raise LayoutError(f"acdc: image {img} has no label {lbl}; expected layout {LAYOUTS['acdc']}")
            out.append(Entry(img, lbl, lbl, stem))
    if not out:
        raise LayoutError(f"acdc: no *_rgb_anon.png under {root / 'rgb_anon'}/<condition>/{split}/<seq>/; "
                          f"expected layout {LAYOUTS['acdc']}")
    return out


def acdc_condition(image: str | os.PathLike) -> str:
    """The ACDC condition of an image path (``.../rgb_anon/<condition>/<split>/<seq>/x.png``),
    "" when the path has none (e.g. a cached copy outside the tree)."""
    parts = Path(image).parts
    for i in range(len(parts) - 1):
        if parts[i] == "rgb_anon" and parts[i + 1] in ACDC_CONDITIONS:
            return parts[i + 1]
    return ""


def server_test_files(dataset: str, root: str | os.PathLike) -> list[Entry]:
    """The unlabelled test images a benchmark server scores (no labels): Cityscapes
    ``leftImg8bit/test/<city>/``, Dark Zurich ``rgb_anon/test/night/<seq>/``, ACDC
    ``rgb_anon/<condition>/test/<seq>/``; names as the val entries'."""
    root = Path(root)
    if dataset == "acdc":
        return acdc_files(root, "test")
    if dataset == "cityscapes":
        folder, suffix = root / "leftImg8bit" / "test", "_leftImg8bit.png"
    elif dataset == "darkzurich":
        folder, suffix = root / "rgb_anon" / "test" / "night", "_rgb_anon.png"
    else:
        raise ValueError(f"dataset: expected cityscapes, darkzurich or acdc for a test split, got {dataset!r}")
    files = _pngs(folder, suffix, recursive=True) if folder.is_dir() else []
    if not files:
        sub = "<city>" if dataset == "cityscapes" else "<seq>"
        raise LayoutError(f"no images under {folder}/{sub}/*{suffix} (the {dataset} test split)")
    return [Entry(p, None, None, p.name[:-len(suffix)]) for p in files]


def list_files(dataset: str, root: str | os.PathLike, split: str = "train") -> list[Entry]:
    if dataset == "gta":
        return gta_files(root)
    if dataset == "synthia":
        return synthia_files(root)
    if dataset == "cityscapes":
        return cityscapes_files(root, split)
    if dataset == "darkzurich":
        return darkzurich_files(root, split)
    if dataset == "acdc":
        return acdc_files(root, split)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
