"""Training and validation datasets (method §1) and :func:`build_datasets`.

Sources (``SourceSet``) yield cropped, flipped, normalised image/label pairs, optionally
drawn by rare class sampling; targets (``TargetSet``) yield whole resized, flipped images
(plus the Dark Zurich day reference); ``ValSet`` yields evaluation batches. Every random
choice is drawn from a ``numpy.random.Generator`` the caller passes in (see
``plans.sample_rng``), so a sample is a pure function of its generator's seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import io, stats
from .cache import detect_cache, use_cache
from .labels import NUM_CLASSES
from .layouts import TRAIN_SCALES, Entry, LayoutError, acdc_condition, list_files
from .rcs import MIN_CROP_PIXELS, MIN_PIXELS, RareClassSampler
from .transforms import (
    CropWindow,
    crop_array,
    fit_size,
    flip_draw,
    normalize,
    plan_crop,
    render_source,
    render_target,
    resize_image,
    resize_label,
)

SOURCES = ("gta", "synthia", "cityscapes", "synthetic")
TARGETS = ("cityscapes", "darkzurich", "acdc", "synthetic")
FOLDERS = {"gta": "gta", "synthia": "synthia", "cityscapes": "cityscapes", "darkzurich": "dark_zurich", "acdc": "acdc"}
CROP_SIZE = (640, 640)
EVAL_SCALES = {"cityscapes": (1280, 640), "darkzurich": (1280, 720), "acdc": (960, 540)}
# Pair-specific sizes that differ from the per-dataset ones: Cityscapes -> ACDC follows the
# DAFormer family's configs (Cityscapes fit 1024x512, crop 512x512; ACDC 960x540; docs/data.md).
PAIR_DEFAULTS = {("cityscapes", "acdc"): {"source_scale": (1024, 512), "crop_size": (512, 512)}}
EVAL_SCALE = EVAL_SCALES["cityscapes"]  # the ValSet default
RCS_REDRAWS = 10


class _Files:
    """File list with lazily cached image sizes and (optionally) decoded arrays in memory."""

    cache: str | None = None  # the prepare --cache format the entries point at (build_datasets sets it)
    cache_note = ""

    def __init__(self, entries: list[Entry], scale: tuple[int, int], in_memory: bool = False):
        if not entries:
            raise ValueError("entries: expected at least one file")
        self.entries = list(entries)
        self.scale = tuple(int(s) for s in scale)
        self.in_memory = in_memory
        self._sizes: dict[int, tuple[int, int]] = {}
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _cached(self, kind: str, i: int, load):
        if not self.in_memory:
            return load()
        key = (kind, i)
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def image(self, i: int) -> np.ndarray:
        return self._cached("img", i, lambda: io.read_image(self.entries[i].image))

    def __getstate__(self):  # DataLoader workers get the file list, not the parent's cache
        state = dict(self.__dict__)
        state["_cache"] = {}
        state.pop("_last_label", None)
        return state

    def ref_image(self, i: int) -> np.ndarray:
        return self._cached("ref", i, lambda: io.read_image(self.entries[i].ref))

    def label(self, i: int) -> np.ndarray:
        return self._cached("lbl", i, lambda: self._checked_label(i))

    def _checked_label(self, i: int) -> np.ndarray:
        """The train-id map of entry i: valid ids, and the shape of its image (io.check_label_shape)."""
        e = self.entries[i]
        label = io.read_train_ids(e.label, NUM_CLASSES)
        io.check_label_shape(label.shape, self.size(i), e.label, e.image)
        return label

    def size(self, i: int) -> tuple[int, int]:
        """Original (h, w) of image i (file header; no decode)."""
        if i not in self._sizes:
            self._sizes[i] = io.image_size(self.entries[i].image)
        return self._sizes[i]

    def resized_size(self, i: int) -> tuple[int, int]:
        return fit_size(*self.size(i), self.scale)

    def label_size(self, i: int) -> tuple[int, int]:
        """Original (h, w) of label i (GTA has a few labels whose size differs from the image)."""
        key = -1 - i
        if key not in self._sizes:
            e = self.entries[i]
            size = io.image_size(e.label)
            io.check_label_shape(size, self.size(i), e.label, e.image)
            self._sizes[key] = size
        return self._sizes[key]


@dataclass(frozen=True)
class SourcePlan:
    index: int
    window: CropWindow
    flip: bool
    resized: tuple[int, int]
    rcs_class: int = -1


@dataclass(frozen=True)
class TargetPlan:
    index: int
    flip: bool
    resized: tuple[int, int]


class SourceSet(_Files):
    """Labelled training set: resize to fit → crop (cat_max_ratio re-draws) → flip → normalise → pad."""

    def __init__(self, entries, *, name: str, scale, crop_size=CROP_SIZE, cat_max_ratio: float = 0.75,
                 rcs: RareClassSampler | None = None, in_memory: bool = False, root: Path | None = None):
        super().__init__(entries, scale, in_memory)
        if any(e.label is None for e in self.entries):
            raise ValueError(f"{name}: a source set needs labels for every image")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio: expected a value in (0, 1], got {cat_max_ratio}")
        self.name, self.root = name, root
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.rcs = rcs

    def resized_label(self, i: int) -> np.ndarray:
        if self.in_memory:
            return self._cached("rlbl", i, lambda: resize_label(self.label(i), self.resized_size(i)))
        # plan() and render() of one sample read the same label: decode it once (read-only use)
        last = getattr(self, "_last_label", None)
        if last is not None and last[0] == i:
            return last[1]
        label = resize_label(self.label(i), self.resized_size(i))
        self._last_label = (i, label)
        return label

    def resized_image(self, i: int) -> np.ndarray:
        """The image resized to fit (cached when in memory: resizing is deterministic)."""
        if not self.in_memory:
            return resize_image(self.image(i), self.resized_size(i))
        return self._cached("rimg", i, lambda: resize_image(self.image(i), self.resized_size(i)))

    def _crop_and_flip(self, rng: np.random.Generator, label: np.ndarray) -> tuple[CropWindow, bool]:
        window = plan_crop(rng, label, self.crop_size, self.cat_max_ratio)
        return window, flip_draw(rng)

    def plan(self, rng: np.random.Generator) -> SourcePlan:
        """Every random decision of one sample: (rare class), file, crop window, flip."""
        if self.rcs is not None:
            cls, index = self.rcs.draw(rng)
        else:
            cls, index = -1, int(rng.integers(0, len(self)))
        label = self.resized_label(index)
        window, flip = self._crop_and_flip(rng, label)
        if self.rcs is not None:
            # DAFormer re-runs the whole pipeline (crop with its own re-draws, flip) until the
            # crop holds more than min_crop_pixels of the sampled class.
            for _ in range(RCS_REDRAWS):
                if int(np.count_nonzero(crop_array(label, window) == cls)) > self.rcs.min_crop_pixels:
                    break
                window, flip = self._crop_and_flip(rng, label)
        return SourcePlan(index, window, flip, tuple(label.shape), cls)

    def render(self, plan: SourcePlan) -> tuple[torch.Tensor, torch.Tensor]:
        return render_source(self.resized_image(plan.index), self.resized_label(plan.index), plan.resized, plan.window,
                             plan.flip, self.crop_size)


class TargetSet(_Files):
    """Unlabelled training set: resize to fit → flip → normalise (whole image, no crop).

    ``with_labels`` (``--pseudo-diagnostics`` only; the training never sees them) adds the
    image's label, resized (nearest) and flipped like the image, as ``"gt"``.
    """

    def __init__(self, entries, *, name: str, scale, in_memory: bool = False, root: Path | None = None,
                 with_labels: bool = False):
        super().__init__(entries, scale, in_memory)
        self.name, self.root = name, root
        self.has_ref = all(e.ref is not None for e in self.entries)
        if with_labels and any(e.label is None for e in self.entries):
            raise ValueError(f"--pseudo-diagnostics: the {name} training images have no labels "
                             "(it needs a labelled target training set: cityscapes or synthetic)")
        self.with_labels = bool(with_labels)

    def plan(self, rng: np.random.Generator) -> TargetPlan:
        index = int(rng.integers(0, len(self)))
        return TargetPlan(index, flip_draw(rng), self.resized_size(index))

    def render(self, plan: TargetPlan) -> dict[str, torch.Tensor]:
        out = {"img": render_target(self.image(plan.index), plan.resized, plan.flip)}
        if self.has_ref:  # the day reference gets the same resize and the same flip
            out["ref_img"] = render_target(self.ref_image(plan.index), plan.resized, plan.flip)
        if self.with_labels:
            lbl = resize_label(self.label(plan.index), plan.resized)
            lbl = lbl[:, ::-1] if plan.flip else lbl
            out["gt"] = torch.from_numpy(lbl.astype(np.int64))[None].contiguous()
        return out


class ValSet(_Files, torch.utils.data.Dataset):
    """Evaluation set: ``{"img" [1,3,h,w] at the eval scale, "gt" [1,1,H0,W0] int64, "name",
    "file", "group"}`` (``file``: the image's file name, e.g. ``*_rgb_anon.png`` for Dark Zurich;
    ``group``: the ACDC condition of the image, "" for the other datasets)."""

    def __init__(self, entries, *, name: str, scale=EVAL_SCALE, in_memory: bool = False, root: Path | None = None):
        super().__init__(entries, scale, in_memory)
        if any(e.label is None for e in self.entries):
            raise ValueError(f"{name}: a validation set needs labels for every image")
        self.name, self.root = name, root

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        img = normalize(resize_image(self.image(i), self.resized_size(i)))
        gt = torch.from_numpy(np.ascontiguousarray(self.label(i))).to(torch.int64)
        return {"img": img[None], "gt": gt[None, None], "name": self.entries[i].name,
                "file": self.entries[i].image.name, "group": self.group(i)}

    def group(self, i: int) -> str:
        """ACDC: the image's condition (fog, night, rain, snow), for per-condition mIoU."""
        return acdc_condition(self.entries[i].image) if self.name == "acdc" else ""

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def val_loader(val_set: ValSet, device: str | torch.device = "cpu", num_workers: int = 0):
    """Iterate validation batches on ``device``, decoding in ``num_workers`` worker processes."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(val_set, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    for batch in loader:
        yield {"img": batch["img"].to(device, non_blocking=True), "gt": batch["gt"].to(device, non_blocking=True),
               "name": batch["name"], "file": batch["file"], "group": batch.get("group", "")}


# ----------------------------------------------------------------------------- building

def dataset_defaults(source: str, target: str) -> dict:
    """Resize scales, crop and eval scale of a source/target pair (method §1; synthetic: 1/5 scale)."""
    from .synthetic import SYNTHETIC_DEFAULTS

    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    syn = SYNTHETIC_DEFAULTS
    out = {
        "source_scale": syn["source_scale"] if source == "synthetic" else TRAIN_SCALES[source],
        "target_scale": syn["target_scale"] if target == "synthetic" else TRAIN_SCALES[target],
        "crop_size": syn["crop_size"] if source == "synthetic" else CROP_SIZE,
        "eval_scale": syn["eval_scale"] if target == "synthetic" else EVAL_SCALES[target],
    }
    if source == "synthetic":
        out["rcs_min_pixels"], out["rcs_min_crop_pixels"] = syn["rcs_min_pixels"], syn["rcs_min_crop_pixels"]
    else:
        out["rcs_min_pixels"], out["rcs_min_crop_pixels"] = MIN_PIXELS, MIN_CROP_PIXELS
    out.update(PAIR_DEFAULTS.get((source, target), {}))
    return out


def dataset_root(name: str, data_root=None) -> Path:
    """Folder of dataset ``name``: ``<data_root>/<folder>``, the data root defaulting to
    ``$SEPICO_FAST_DATA`` or ``./data``."""
    base = Path(data_root if data_root is not None else os.environ.get("SEPICO_FAST_DATA", "data"))
    return base / FOLDERS[name]


def _root(name: str, data_root, override) -> Path:
    return Path(override) if override is not None else dataset_root(name, data_root)


def _require_prepared(name: str, root: Path, entries: list[Entry]) -> None:
    missing = [e.label for e in entries if e.label is not None and not e.label.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} train-id label(s) missing, e.g. {missing[0]}; "
                                f"run `python -m sepico_fast.prepare {name} {root}` first")


def build_datasets(source: str, target: str, data_root=None, *, source_root=None, target_root=None,
                   source_scale=None, target_scale=None, crop_size=None, eval_scale=None,
                   cat_max_ratio: float = 0.75, rcs: bool = True, rcs_temperature: float = 0.01,
                   rcs_min_pixels: int | None = None, rcs_min_crop_pixels: int | None = None,
                   in_memory: bool | None = None, val_split: str = "val",
                   synthetic_cache: str | os.PathLike | None = None, synthetic_options: dict | None = None,
                   cache: str | None = None, target_labels: bool = False):
    """(train_source, train_target, val_target) for a source → target pair.

    source: gta | synthia | cityscapes | synthetic;  target: cityscapes | darkzurich | acdc | synthetic.
    Dataset folders are ``data_root/{gta,synthia,cityscapes,dark_zurich,acdc}`` (data_root defaults
    to ``$SEPICO_FAST_DATA`` or ``./data``) unless ``source_root``/``target_root`` are given.
    Sizes default to :func:`dataset_defaults`; ``in_memory`` (default: only for the synthetic
    pair) keeps decoded files in memory. The synthetic pair is generated by
    ``synthetic.ensure_synthetic(synthetic_cache, **synthetic_options)`` (``data_root`` is not
    used for it). ``cache`` ("png" | "jpeg") reads the pre-resized copies written by
    ``prepare --cache`` at the source/target scales (validation images only when the eval
    scale equals the target scale; validation labels always at full size) and raises
    ``cache.CacheError`` when one is missing, incomplete or stale; ``"auto"`` reads a png
    cache of a dataset when it is complete and fresh, else the originals
    (``cache.detect_cache``); None or ``"off"``: the originals. The three sets get
    ``.cache`` (the format read, or None) and ``.cache_note`` (one line for the log, or "").
    ``target_labels`` makes the target training set yield its labels too (``--pseudo-diagnostics``).
    """
    if cache not in (None, "off", "auto", "png", "jpeg"):
        raise ValueError(f"cache: expected None, 'off', 'auto', 'png' or 'jpeg', got {cache!r}")
    cache = None if cache == "off" else cache
    d = dataset_defaults(source, target)
    source_scale = tuple(source_scale or d["source_scale"])
    target_scale = tuple(target_scale or d["target_scale"])
    crop_size = tuple(crop_size or d["crop_size"])
    eval_scale = tuple(eval_scale or d["eval_scale"])
    for arg, value in (("source_scale", source_scale), ("target_scale", target_scale), ("crop_size", crop_size),
                       ("eval_scale", eval_scale)):
        if len(value) != 2 or min(value) <= 0:
            raise ValueError(f"{arg}: expected two positive sizes, got {value}")
    min_pixels = d["rcs_min_pixels"] if rcs_min_pixels is None else int(rcs_min_pixels)
    min_crop = d["rcs_min_crop_pixels"] if rcs_min_crop_pixels is None else int(rcs_min_crop_pixels)

    syn = None
    if "synthetic" in (source, target):
        from .synthetic import ensure_synthetic

        syn = ensure_synthetic(synthetic_cache, **(synthetic_options or {}))

    # source
    if source == "synthetic":
        src_name, src_root, src_entries = "gta", syn.source, list_files("gta", syn.source)
    else:
        src_name, src_root = source, _root(source, data_root, source_root)
        src_entries = list_files(source, src_root, "train")
    _require_prepared(src_name, src_root, src_entries)
    sampler = None
    if rcs:
        counts = stats.counts_for(src_root, [e.label for e in src_entries], NUM_CLASSES)
        sampler = RareClassSampler(counts, rcs_temperature, min_pixels, min_crop)
    src_cache, src_note = _cache_choice(cache, source, src_name, src_root, [(src_entries, source_scale, True)])
    if src_cache is not None:
        src_entries = use_cache(src_root, src_entries, src_cache, source_scale, with_labels=True,
                                checked=cache == "auto")
    mem = (source == "synthetic") if in_memory is None else in_memory
    train_source = SourceSet(src_entries, name=source, scale=source_scale, crop_size=crop_size,
                             cat_max_ratio=cat_max_ratio, rcs=sampler, in_memory=mem, root=src_root)
    train_source.cache, train_source.cache_note = src_cache, src_note

    # target
    if target == "synthetic":
        tgt_name, tgt_root = "cityscapes", syn.target
    else:
        tgt_name, tgt_root = target, _root(target, data_root, target_root)
    mem = (target == "synthetic") if in_memory is None else in_memory
    tgt_entries = list_files(tgt_name, tgt_root, "train")
    val_entries = list_files(tgt_name, tgt_root, val_split)
    _require_prepared(tgt_name, tgt_root, val_entries)
    if target_labels:
        _require_prepared(tgt_name, tgt_root, tgt_entries)
    groups = [(tgt_entries, target_scale, False)] + ([(val_entries, target_scale, False)]
                                                     if eval_scale == target_scale else [])
    tgt_cache, tgt_note = _cache_choice(cache, target, tgt_name, tgt_root, groups)
    if tgt_cache is not None:
        tgt_entries = use_cache(tgt_root, tgt_entries, tgt_cache, target_scale, with_labels=False,
                                checked=cache == "auto")
        if eval_scale == target_scale:
            val_entries = use_cache(tgt_root, val_entries, tgt_cache, target_scale, with_labels=False,
                                    checked=cache == "auto")
    train_target = TargetSet(tgt_entries, name=target, scale=target_scale, in_memory=mem, root=tgt_root,
                             with_labels=target_labels)
    val_target = ValSet(val_entries, name=target, scale=eval_scale, in_memory=mem, root=tgt_root)
    train_target.cache, train_target.cache_note = tgt_cache, tgt_note
    val_target.cache = tgt_cache if eval_scale == target_scale else None
    val_target.cache_note = ""
    return train_source, train_target, val_target


def _cache_choice(cache: str | None, dataset: str, name: str, root: Path, groups) -> tuple[str | None, str]:
    """(format to read or None, log note) for one dataset under ``build_datasets(cache=...)``."""
    if cache is None or (cache == "auto" and dataset == "synthetic"):  # the synthetic pair is held in memory
        return None, ""
    if cache == "auto":
        return detect_cache(name, root, groups)
    return cache, f"{name}: reading the {cache} cache in {root / '.sepico_cache'} (--cache {cache})"


def build_val_set(target: str, data_root=None, *, target_root=None, eval_scale=None, split: str = "val",
                  in_memory: bool | None = None, synthetic_cache: str | os.PathLike | None = None,
                  synthetic_options: dict | None = None) -> ValSet:
    """Only the evaluation set of ``target`` (cityscapes | darkzurich | acdc | synthetic): no source needed."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    if target == "synthetic":
        from .synthetic import SYNTHETIC_DEFAULTS, ensure_synthetic

        name, root = "cityscapes", ensure_synthetic(synthetic_cache, **(synthetic_options or {})).target
        scale = SYNTHETIC_DEFAULTS["eval_scale"]
    else:
        name, root, scale = target, _root(target, data_root, target_root), EVAL_SCALES[target]
    entries = list_files(name, root, split)
    _require_prepared(name, root, entries)
    mem = (target == "synthetic") if in_memory is None else in_memory
    return ValSet(entries, name=target, scale=tuple(eval_scale or scale), in_memory=mem, root=root)


__all__ = ["EVAL_SCALES", "TRAIN_SCALES", "build_val_set", "dataset_root", "SourceSet", "TargetSet", "ValSet", "SourcePlan",
           "TargetPlan", "build_datasets", "dataset_defaults", "val_loader", "LayoutError"]
