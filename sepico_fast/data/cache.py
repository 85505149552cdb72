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


class CacheError(FileNotFoundError):
    """A cache that was asked for (``cache="png"|"jpeg"``) is missing, incomplete or older
    than its originals; ``str()`` is one line saying what to re-run."""


def cache_state(root: Path, entries: list[Entry], fmt: str, scale: tuple[int, int],
                with_labels: bool) -> tuple[str, str]:
    """Whether the cache at ``scale`` holds a fresh copy of every file the entries read.

    Returns ``("ok", "")``, ``("missing", why)`` (no cache folder), ``("partial", why)``
    (some cached files do not exist) or ``("stale", why)`` (some are older than the file
    they were made from: the original was replaced after ``prepare --cache``). Files: the
    images, the Dark Zurich day references and, with ``with_labels``, the train-id labels.
    One ``stat`` per file and per original (no decoding).
    """
    root = Path(root)
    croot = cache_root(root, fmt, scale)
    if not croot.is_dir():
        return "missing", f"{croot} does not exist"
    total = missing = stale = 0
    first_missing = first_stale = None
    for e in entries:
        pairs = [(e.image, cached_image_path(root, croot, e.image, fmt))]
        if with_labels and e.label is not None:
            pairs.append((e.label, cached_label_path(root, croot, e.label)))
        if e.ref is not None:
            pairs.append((e.ref, cached_image_path(root, croot, e.ref, fmt)))
        for orig, cached in pairs:
            total += 1
            try:
                cached_mtime = cached.stat().st_mtime
            except OSError:
                missing += 1
                first_missing = first_missing or cached
                continue
            try:
                if cached_mtime < Path(orig).stat().st_mtime:
                    stale += 1
                    first_stale = first_stale or cached
            except OSError:  # a missing original is reported by whoever reads it
                pass
    if missing:
        return "partial", f"{missing} of {total} cached files missing in {croot}, e.g. {first_missing}"
    if stale:
        return "stale", f"{stale} of {total} cached files in {croot} are older than their originals, e.g. {first_stale}"
    return "ok", ""


def _cached_entries(root: Path, entries: list[Entry], fmt: str, scale: tuple[int, int],
                    with_labels: bool) -> list[Entry]:
    croot = cache_root(root, fmt, scale)
    out = []
    for e in entries:
        img = cached_image_path(root, croot, e.image, fmt)
        lbl = cached_label_path(root, croot, e.label) if (with_labels and e.label is not None) else e.label
        ref = cached_image_path(root, croot, e.ref, fmt) if e.ref is not None else None
        out.append(Entry(img, e.raw_label, lbl, e.name, ref))
    return out


def use_cache(root: Path, entries: list[Entry], fmt: str, scale: tuple[int, int], with_labels: bool,
              checked: bool = False) -> list[Entry]:
    """The entries pointing at the cached copies (labels too when ``with_labels``); raises
    CacheError when the cache is missing, incomplete or stale (``checked``: the caller has
    just seen ``cache_state`` say "ok", e.g. through ``detect_cache``)."""
    state, why = ("ok", "") if checked else cache_state(root, entries, fmt, scale, with_labels)
    if state != "ok":
        raise CacheError(f"{why}: re-run `python -m sepico_fast.prepare <dataset> {root} --cache {fmt}` "
                         f"(scale {int(scale[0])} {int(scale[1])}), or train without --cache {fmt}")
    return _cached_entries(root, entries, fmt, scale, with_labels)


def detect_cache(name: str, root: Path, groups: list[tuple[list[Entry], tuple[int, int], bool]]
                 ) -> tuple[str | None, str]:
    """``cache="auto"``: ``("png", note)`` when a png cache holds a fresh copy of every file
    of every group ``(entries, scale, with_labels)``, else ``(None, note)``.

    Only the lossless png cache is picked (its batches are bit-identical to decoding the
    originals); a jpeg cache changes the pixels and is used only when asked for. ``note``
    is one line for the log: which cache is read, or why one that exists is not ("" when
    there is no cache folder at all).
    """
    root = Path(root)
    states = [cache_state(root, entries, "png", scale, labels) for entries, scale, labels in groups]
    if states and all(state == "ok" for state, _ in states):
        folders = sorted({str(cache_root(root, "png", scale)) for _, scale, _ in groups})
        return "png", f"{name}: reading the png cache {', '.join(folders)} (lossless; --cache off to decode the originals)"
    bad = next(((state, why) for state, why in states if state in ("partial", "stale")), None)
    if bad is not None:
        return None, (f"{name}: png cache ignored ({bad[0]}: {bad[1]}); decoding the originals. Re-run "
                      f"`python -m sepico_fast.prepare {name} {root} --cache png` to use it")
    if (root / CACHE_DIR).is_dir() and any(p.name.startswith("jpeg_") for p in (root / CACHE_DIR).iterdir()):
        return None, (f"{name}: a jpeg cache exists in {root / CACHE_DIR} but --cache auto reads only png "
                      "(jpeg is lossy); pass --cache jpeg to use it")
    return None, ""
