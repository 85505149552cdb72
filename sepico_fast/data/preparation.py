"""One-time dataset preparation (``python -m sepico_fast.prepare`` is its command line).

``prepare(dataset, root)`` writes the 8-bit train-id map ``*_labelTrainIds.png`` next to
every label (method §1 tables; Dark Zurich labels already are train ids and are only
checked) and collects the class pixel counts into ``ROOT/sample_class_stats.json`` (rare
class sampling, method §6.9). Every image is decoded in full, every label value checked, in
a pool of worker processes; all bad files are reported together (``BadFilesError``) and the
statistics are then not written, so a rerun checks them again. Re-running is idempotent: a
train-id map newer than its label, with an entry in the stats file, is skipped.

``check(dataset, root)`` verifies an already prepared dataset without writing anything:
every image (and Dark Zurich day reference) decodes, every train-id map decodes, holds only
train ids and matches its class counts in the stats file.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import io, stats
from .cache import cache_job, cache_jobs, cache_root
from .labels import NUM_CLASSES, cityscapes_ids_to_train_ids, class_pixel_counts, synthia_ids_to_train_ids
from .layouts import DATASETS, TRAIN_SCALES, Entry, LayoutError, darkzurich_pairs, list_files


class PrepareWriteError(Exception):
    """A file ``prepare`` could not write (a full disk, a read-only folder): one line. The run
    stops at the first (every other write would fail the same way); its temp files are removed."""


class BadFilesError(Exception):
    """Data files that cannot be read or hold invalid values; ``errors`` lists them all.

    ``str()`` is one line for one file, else a count line followed by one line per file.
    """

    def __init__(self, errors: list[io.DataFileError]):
        self.errors = sorted(errors, key=lambda e: e.path)
        lines = [str(e) for e in self.errors]
        text = lines[0] if len(lines) == 1 else "\n".join([f"{len(lines)} bad files:"] + ["  " + x for x in lines])
        super().__init__(text)


# ----------------------------------------------------------------------------- worker jobs

def _convert(dataset: str, raw: Path) -> np.ndarray:
    if dataset == "synthia":
        arr = io.read_png16(raw)
        return synthia_ids_to_train_ids(arr[..., 0])  # class id in R (the last channel read as BGR)
    label = io.read_label(raw)
    if dataset in ("darkzurich", "acdc"):  # already train ids: only check them
        return io.check_train_ids(label, raw, NUM_CLASSES)
    return cityscapes_ids_to_train_ids(io.check_label_ids(label, raw, dataset))


def _job(args: tuple[str, str, str | None, str | None, bool]) -> tuple:
    """Worker: ('ok', output, counts, size, converted) or ('error', path, reason, action).

    The image is decoded in full: a truncated file has a valid header."""
    dataset, image, raw, out, convert = args
    try:
        h, w = io.read_image(image).shape[:2]
        if raw is None:
            return ("ok", None, None, [h, w], False)
        if convert:
            train_ids = _convert(dataset, Path(raw))
            io.check_label_shape(train_ids.shape, (h, w), raw, image)
            if out != raw:
                io.write_label(out, train_ids)
        else:
            train_ids = io.read_train_ids(out, NUM_CLASSES)
            io.check_label_shape(train_ids.shape, (h, w), out, image)
        return ("ok", out, class_pixel_counts(train_ids, NUM_CLASSES).tolist(), list(train_ids.shape), convert)
    except io.DataFileError as exc:
        return ("error", exc.path, exc.reason, exc.action)
    except OSError as exc:  # e.g. the output folder is not writable
        return ("error", out, io.os_reason(exc), "write")


def _check_job(args: tuple) -> tuple:
    """Worker of ``check``: ('ok',) or ('error', path, reason, action).

    The label as distributed is decoded too (a lossy or re-coloured one is named) and its
    conversion compared with the train-id map."""
    image, label, counts, dataset, raw = (tuple(args) + (None, None))[:5]
    try:
        h, w = io.read_image(image).shape[:2]
        if label is None:
            return ("ok",)
        if not Path(label).is_file():
            return ("error", label, "train-id label missing (run python -m sepico_fast.prepare first)", "read")
        train_ids = io.read_train_ids(label, NUM_CLASSES)
        io.check_label_shape(train_ids.shape, (h, w), label, image)
        if counts is None:
            return ("error", label, f"no entry in {stats.STATS_FILE} (run python -m sepico_fast.prepare)", "check")
        if class_pixel_counts(train_ids, NUM_CLASSES).tolist() != list(counts):
            return ("error", label, f"class counts differ from {stats.STATS_FILE} (the file changed after "
                                    "prepare: rerun python -m sepico_fast.prepare)", "check")
        if raw is not None and raw != label and Path(raw).is_file():
            converted = _convert(dataset, Path(raw))
            if converted.shape != train_ids.shape or not np.array_equal(converted, train_ids):
                return ("error", label, f"differs from the conversion of {raw} (the label changed after prepare: "
                                        "rerun python -m sepico_fast.prepare)", "check")
        return ("ok",)
    except io.DataFileError as exc:
        return ("error", exc.path, exc.reason, exc.action)


# ----------------------------------------------------------------------------- driver

class _Progress:
    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled and total > 0
        self.tty = sys.stderr.isatty()
        self.start, self.last, self.done = time.perf_counter(), 0.0, 0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self.last < (0.2 if self.tty else 5.0) and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        width = 30
        fill = int(width * self.done / self.total)
        line = (f"[prepare {self.label}] |{'#' * fill}{'.' * (width - fill)}| {self.done}/{self.total} "
                f"{rate:.0f} files/s")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _run_jobs(fn, jobs: list, workers: int, bar: _Progress) -> tuple[list, list[io.DataFileError]]:
    """(successful results, errors) of ``fn`` over ``jobs``, in ``workers`` processes."""
    if workers > 1 and len(jobs) > 32:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
        results = pool.imap_unordered(fn, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
    else:
        pool, results = None, map(fn, jobs)
    done, errors = [], []
    try:
        for res in results:
            if res[0] == "error":
                err = io.DataFileError(*res[1:])
                if err.action == "write":  # a full disk or an unwritable folder: every other write fails too
                    raise PrepareWriteError(f"{err}; temp files removed, finished files kept: fix it and rerun")
                errors.append(err)
            else:
                done.append(res)
            bar.step()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return done, errors


def _write_stats(root: Path, dataset: str, files: dict) -> Path:
    try:
        return stats.write_stats(root, dataset, files, NUM_CLASSES)
    except OSError as exc:
        raise PrepareWriteError(f"cannot write {root / stats.STATS_FILE}: {exc.strerror or exc}; labels kept: fix "
                                "it and rerun") from None


def _workers(workers: int | None) -> int:
    return (os.cpu_count() or 1) if workers is None else max(0, int(workers))


def _entries(dataset: str, root: Path) -> list[Entry]:
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if not root.is_dir():
        raise LayoutError(f"{dataset}: dataset root {root} is not a folder")
    if dataset in ("gta", "synthia"):
        return list_files(dataset, root)
    if dataset == "darkzurich":
        darkzurich_pairs(root)  # checks the correspondence tables' layout
    return list_files(dataset, root, "train") + list_files(dataset, root, "val")


def prepare(dataset: str, root: str | os.PathLike, workers: int | None = None, progress: bool = True,
            cache: str | None = None, cache_scale: tuple[int, int] | None = None) -> dict:
    """Convert labels and write the class statistics; returns a summary dict.

    ``cache`` ("png" | "jpeg") also writes images pre-resized to ``cache_scale`` (default: the
    dataset's training scale, method §1) and resized training labels (see ``data/cache.py``).
    Raises LayoutError for a wrong layout and BadFilesError listing every bad file.
    """
    root = Path(root)
    entries = _entries(dataset, root)
    io.remove_temp_files([root])  # left by an earlier run that was killed or ran out of disk
    try:
        return _prepare(dataset, root, entries, workers, progress, cache, cache_scale)
    except BaseException:
        io.remove_temp_files([root])  # those of worker processes stopped in the middle of a write
        raise


def _prepare(dataset, root, entries, workers, progress, cache, cache_scale) -> dict:
    old = (stats.read_stats(root) or {}).get("files", {})
    jobs, ref_images = [], []
    for e in entries:
        if e.ref is not None:
            ref_images.append(e.ref)
        if e.raw_label is None:
            jobs.append((dataset, str(e.image), None, None, False))
            continue
        key = e.label.relative_to(root).as_posix()
        up_to_date = (e.label != e.raw_label and e.label.is_file()
                      and e.label.stat().st_mtime >= e.raw_label.stat().st_mtime)
        if up_to_date and key in old:
            continue
        jobs.append((dataset, str(e.image), str(e.raw_label), str(e.label), not up_to_date))
    jobs += [(dataset, str(p), None, None, False) for p in ref_images]

    workers = _workers(workers)
    results, errors = _run_jobs(_job, jobs, workers, _Progress(dataset, len(jobs), progress))
    if errors:  # statistics not written: a rerun checks these entries again
        raise BadFilesError(errors)
    files = dict(old)
    converted = 0
    for _, out, counts, size, did_convert in results:
        if out is not None:
            files[Path(out).relative_to(root).as_posix()] = {"counts": counts, "size": size}
        converted += int(did_convert)
    keys = {e.label.relative_to(root).as_posix() for e in entries if e.label is not None}
    files = {k: v for k, v in files.items() if k in keys}  # drop entries of files that disappeared
    stats_path = _write_stats(root, dataset, files)
    summary = {"dataset": dataset, "root": str(root), "files": len(entries), "labels": len(keys),
               "converted": converted, "skipped": len(keys) - converted, "stats": str(stats_path)}
    if cache is not None:
        scale = tuple(cache_scale) if cache_scale else TRAIN_SCALES[dataset]
        train = _entries_for_cache(dataset, root)
        jobs = cache_jobs(root, train["labelled"], cache, scale, True) + \
            cache_jobs(root, train["unlabelled"], cache, scale, False)
        _, errors = _run_jobs(cache_job, jobs, workers, _Progress(f"{dataset} cache", len(jobs), progress))
        if errors:
            raise BadFilesError(errors)
        summary["cache"] = str(cache_root(root, cache, scale))
        summary["cached"] = len(jobs)
    return summary


def check(dataset: str, root: str | os.PathLike, workers: int | None = None, progress: bool = True) -> dict:
    """Verify a prepared dataset (writes nothing); raises BadFilesError listing every bad file."""
    root = Path(root)
    entries = _entries(dataset, root)
    recorded = (stats.read_stats(root) or {}).get("files", {})
    jobs = []
    for e in entries:
        key = e.label.relative_to(root).as_posix() if e.label is not None else None
        counts = recorded.get(key, {}).get("counts") if key is not None else None
        raw = str(e.raw_label) if e.raw_label is not None and e.label is not None else None
        jobs.append((str(e.image), str(e.label) if e.label is not None else None, counts, dataset, raw))
        if e.ref is not None:
            jobs.append((str(e.ref), None, None))
    _, errors = _run_jobs(_check_job, jobs, _workers(workers), _Progress(f"{dataset} check", len(jobs), progress))
    if errors:
        raise BadFilesError(errors)
    return {"dataset": dataset, "root": str(root), "files": len(jobs),
            "labels": sum(1 for e in entries if e.label is not None)}


def _entries_for_cache(dataset: str, root: Path) -> dict:
    """Training files whose labels the source pipeline reads (resized too), and the rest."""
    if dataset in ("gta", "synthia"):
        return {"labelled": list_files(dataset, root), "unlabelled": []}
    if dataset == "cityscapes":  # a source (CS -> Dark Zurich) or a target: cache train labels too
        return {"labelled": list_files(dataset, root, "train"), "unlabelled": list_files(dataset, root, "val")}
    return {"labelled": [], "unlabelled": list_files(dataset, root, "train") + list_files(dataset, root, "val")}
