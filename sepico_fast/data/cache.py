"""Pre-resized copies of a dataset (``python -m sepico_fast.prepare ... --cache {png,jpeg}``).

Training resizes every image to fit its scale first (GTA 1914×1052 → 1280×704), so the
decode + resize of the full-size file is most of the input pipeline's work. The cache
stores each image already resized (bilinear, exactly as the pipelines do) under
``ROOT/.sepico_cache/<fmt>_<W>x<H>/`` with the dataset's relative paths, and for labelled
training files the train-id label resized with nearest neighbour. Then the pipelines'
resize is the identity:

* ``png``: lossless — batches are bit-identical to the uncached ones; about 2.2× fewer
  pixels to decode (GTA).
* ``jpeg`` (quality 95, 4:4:4): lossy (±1..3 levels), several times smaller and faster to
  decode, and with ``pipeline="dali"`` decoded on the GPU by nvJPEG instead of on CPU threads.

Validation labels always stay at their original size (evaluation is at full resolution).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import io
from .layouts import Entry
from .transforms import fit_size, resize_image, resize_label

CACHE_FORMATS = ("png", "jpeg")
CACHE_DIR = ".sepico_cache"


def cache_root(root: str | os.PathLike, fmt: str, scale: tuple[int, int]) -> Path:
    if fmt not in CACHE_FORMATS:
        raise ValueError(f"cache format: expected one of {CACHE_FORMATS}, got {fmt!r}")
    return Path(root) / CACHE_DIR / f"{fmt}_{int(scale[0])}x{int(scale[1])}"


def cached_image_path(root: Path, croot: Path, path: Path, fmt: str) -> Path:
    rel = Path(path).relative_to(root)
    return croot / rel.with_suffix(".jpg" if fmt == "jpeg" else ".png")


def cached_label_path(root: Path, croot: Path, path: Path) -> Path:
    return croot / Path(path).relative_to(root)


def cache_job(args: tuple) -> tuple:
    """Worker: write the resized image (and label). ('ok',) or ('error', path, reason, action)."""
    image, label, out_image, out_label, scale, fmt = args
    try:
        img = io.read_image(image)
        size = fit_size(img.shape[0], img.shape[1], scale)
        small = resize_image(img, size)
        Path(out_image).parent.mkdir(parents=True, exist_ok=True)
        if fmt == "jpeg":
            io.atomic_write(out_image, lambda tmp: Image.fromarray(small).save(tmp, format="JPEG", quality=95,
                                                                               subsampling=0))
        else:
            io.atomic_write(out_image, lambda tmp: Image.fromarray(small).save(tmp, format="PNG", compress_level=1))
        if label is not None:
            Path(out_label).parent.mkdir(parents=True, exist_ok=True)
            io.write_label(out_label, np.ascontiguousarray(resize_label(io.read_label(label), size)))
        return ("ok",)
    except io.DataFileError as exc:
        return ("error", exc.path, exc.reason, exc.action)
    except OSError as exc:
        return ("error", out_image, io.os_reason(exc), "write")


def cache_jobs(root: Path, entries: list[Entry], fmt: str, scale: tuple[int, int], with_labels: bool) -> list[tuple]:
    """Jobs for files whose cached copy is missing or older than the original."""
    croot = cache_root(root, fmt, scale)
    jobs = []
    for e in entries:
        for img, lbl in ((e.image, e.label if with_labels else None), (e.ref, None)):
            if img is None:
                continue
            out_img = cached_image_path(root, croot, img, fmt)
            out_lbl = cached_label_path(root, croot, lbl) if lbl is not None else None
            fresh = out_img.is_file() and out_img.stat().st_mtime >= img.stat().st_mtime and (
                lbl is None or (out_lbl.is_file() and out_lbl.stat().st_mtime >= lbl.stat().st_mtime))
            if not fresh:
                jobs.append((str(img), str(lbl) if lbl is not None else None, str(out_img),
                             str(out_lbl) if out_lbl is not None else None, tuple(scale), fmt))
    return jobs


def use_cache(root: Path, entries: list[Entry], fmt: str, scale: tuple[int, int], with_labels: bool) -> list[Entry]:
    """The entries pointing at the cached copies (labels too when ``with_labels``)."""
    croot = cache_root(root, fmt, scale)
    if not croot.is_dir():
        raise FileNotFoundError(f"{croot} not found: run `python -m sepico_fast.prepare <dataset> {root} "
                                f"--cache {fmt}` with the same scale first")
    out = []
    for e in entries:
        img = cached_image_path(root, croot, e.image, fmt)
        lbl = cached_label_path(root, croot, e.label) if (with_labels and e.label is not None) else e.label
        ref = cached_image_path(root, croot, e.ref, fmt) if e.ref is not None else None
        for p in (img, lbl if with_labels else None, ref):
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"cached file {p} is missing: re-run `python -m sepico_fast.prepare "
                                        f"<dataset> {root} --cache {fmt}`")
        out.append(Entry(img, e.raw_label, lbl, e.name, ref))
    return out
