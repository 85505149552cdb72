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

DATASETS = ("gta", "synthia", "cityscapes", "darkzurich")

LAYOUTS = {
    "gta": "ROOT/images/*.png and ROOT/labels/*.png (palette PNGs of Cityscapes label ids, same file names)",
    "synthia": "ROOT/RGB/*.png and ROOT/GT/LABELS/*.png (16-bit PNGs, class id in R; SYNTHIA RAND_CITYSCAPES)",
    "cityscapes": "ROOT/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                  "ROOT/gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
    "darkzurich": "ROOT/rgb_anon/{train,val}/{night,day}/<seq>/*_rgb_anon.png, "
                  "ROOT/gt/val/night/<seq>/*_gt_labelTrainIds.png and ROOT/corresp/train/night/*.csv",
}


# Training resize scales (long side, short side) of each dataset (method §1). Dark Zurich
# (1920x1080) fits 1280x720 for training and evaluation, its day references too (the
# authors' Dark Zurich configs).
TRAIN_SCALES = {"gta": (1280, 720), "synthia": (1280, 760), "cityscapes": (1280, 640), "darkzurich": (1280, 720)}


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


def list_files(dataset: str, root: str | os.PathLike, split: str = "train") -> list[Entry]:
    if dataset == "gta":
        return gta_files(root)
    if dataset == "synthia":
        return synthia_files(root)
    if dataset == "cityscapes":
        return cityscapes_files(root, split)
    if dataset == "darkzurich":
        return darkzurich_files(root, split)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
