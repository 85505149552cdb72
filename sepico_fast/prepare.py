"""One-time dataset preparation: ``python -m sepico_fast.prepare {gta,synthia,cityscapes,darkzurich} ROOT``.

For every label of the dataset it writes the 8-bit train-id map ``*_labelTrainIds.png``
next to the label (SPEC §1 tables; Dark Zurich labels already are train ids and are only
checked) and collects its class pixel counts into ``ROOT/sample_class_stats.json`` (rare
class sampling, SPEC §6.9). Image headers are checked too. Work is spread over
``--workers`` processes with a progress bar on stderr.

Re-running is idempotent: a train-id map newer than its label, with an entry in the stats
file, is skipped. A corrupt or unreadable file stops the run with exit status 1 and one
line naming the file; a folder that does not have the expected layout with exit status 2
and one line naming the folder and the layout.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from .data import io, stats
from .data.cache import CACHE_FORMATS, cache_job, cache_jobs, cache_root
from .data.datasets import TRAIN_SCALES
from .data.labels import NUM_CLASSES, class_pixel_counts, cityscapes_ids_to_train_ids, synthia_ids_to_train_ids
from .data.layouts import DATASETS, Entry, LayoutError, darkzurich_pairs, list_files


def _convert(dataset: str, raw: Path) -> np.ndarray:
    if dataset == "synthia":
        arr = io.read_png16(raw)
        return synthia_ids_to_train_ids(arr[..., 0])  # class id in R (the last channel read as BGR)
    label = io.read_label(raw)
    if dataset == "darkzurich":  # already train ids: only check them
        bad = (label >= NUM_CLASSES) & (label != 255)
        if bad.any():
            raise io.DataFileError(raw, f"value {int(label[bad][0])} is not a train id (0..{NUM_CLASSES - 1} or 255)")
        return label
    return cityscapes_ids_to_train_ids(label)


def _job(args: tuple[str, str, str | None, str | None, bool]) -> tuple:
    """Worker: ('ok', output, counts, size, converted) or ('error', path, reason, action)."""
    dataset, image, raw, out, convert = args
    try:
        h, w = io.image_size(image)
        if raw is None:
            return ("ok", None, None, [h, w], False)
        if convert:
            train_ids = _convert(dataset, Path(raw))
            if out != raw:
                io.write_label(out, train_ids)
        else:
            train_ids = io.read_label(out)
        return ("ok", out, class_pixel_counts(train_ids, NUM_CLASSES).tolist(), list(train_ids.shape), convert)
    except io.DataFileError as exc:
        return ("error", exc.path, exc.reason, exc.action)
    except OSError as exc:  # e.g. the output folder is not writable
        return ("error", out, exc.strerror or str(exc), "write")


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


def _entries(dataset: str, root: Path) -> list[Entry]:
    if dataset in ("gta", "synthia"):
        return list_files(dataset, root)
    if dataset == "cityscapes":
        return list_files(dataset, root, "train") + list_files(dataset, root, "val")
    darkzurich_pairs(root)  # checks the correspondence tables' layout
    return list_files(dataset, root, "train") + list_files(dataset, root, "val")


def prepare(dataset: str, root: str | os.PathLike, workers: int | None = None, progress: bool = True,
            cache: str | None = None, cache_scale: tuple[int, int] | None = None) -> dict:
    """Convert labels and write the class statistics; returns a summary dict.

    ``cache`` ("png" | "jpeg") also writes images pre-resized to ``cache_scale`` (default: the
    dataset's training scale, SPEC §1) and resized training labels (see ``data/cache.py``).
    Raises LayoutError for a wrong layout and io.DataFileError for the first unreadable file.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{dataset}: dataset root {root} is not a folder")
    entries = _entries(dataset, root)
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

    files = {k: v for k, v in old.items()}
    converted = 0
    workers = os.cpu_count() or 1 if workers is None else max(0, int(workers))
    for res in _run_jobs(_job, jobs, workers, _Progress(dataset, len(jobs), progress)):
        _, out, counts, size, did_convert = res
        if out is not None:
            files[Path(out).relative_to(root).as_posix()] = {"counts": counts, "size": size}
        converted += int(did_convert)
    keys = {e.label.relative_to(root).as_posix() for e in entries if e.label is not None}
    files = {k: v for k, v in files.items() if k in keys}  # drop entries of files that disappeared
    stats_path = stats.write_stats(root, dataset, files, NUM_CLASSES)
    summary = {"dataset": dataset, "root": str(root), "files": len(entries), "labels": len(keys),
               "converted": converted, "skipped": len(keys) - converted, "stats": str(stats_path)}
    if cache is not None:
        scale = tuple(cache_scale) if cache_scale else TRAIN_SCALES[dataset]
        train = _entries_for_cache(dataset, root)
        jobs = cache_jobs(root, train["labelled"], cache, scale, True) + \
            cache_jobs(root, train["unlabelled"], cache, scale, False)
        for _ in _run_jobs(cache_job, jobs, workers, _Progress(f"{dataset} cache", len(jobs), progress)):
            pass
        summary["cache"] = str(cache_root(root, cache, scale))
        summary["cached"] = len(jobs)
    return summary


def _entries_for_cache(dataset: str, root: Path) -> dict:
    """Training files whose labels the source pipeline reads (resized too), and the rest."""
    if dataset in ("gta", "synthia"):
        return {"labelled": list_files(dataset, root), "unlabelled": []}
    if dataset == "cityscapes":  # a source (CS -> Dark Zurich) or a target: cache train labels too
        return {"labelled": list_files(dataset, root, "train"), "unlabelled": list_files(dataset, root, "val")}
    return {"labelled": [], "unlabelled": list_files(dataset, root, "train") + list_files(dataset, root, "val")}


def _run_jobs(fn, jobs: list, workers: int, bar: "_Progress"):
    """Yield the successful results of ``fn`` over ``jobs``; the first failure raises DataFileError."""
    if workers > 1 and len(jobs) > 32:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
        results = pool.imap_unordered(fn, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
    else:
        pool, results = None, map(fn, jobs)
    try:
        for res in results:
            if res[0] == "error":
                raise io.DataFileError(*res[1:])
            bar.step()
            yield res
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sepico_fast.prepare", description=(
        "Write *_labelTrainIds.png next to every label and ROOT/sample_class_stats.json (run once per dataset)."))
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("root", help="dataset folder in its official layout")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--cache", choices=CACHE_FORMATS, default=None,
                        help="also write images pre-resized to the training scale (png: lossless, identical "
                             "batches; jpeg: smaller, GPU-decodable by DALI, lossy); use with --cache in training")
    parser.add_argument("--cache-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                        help="scale of the cached copies (default: the dataset's training scale, e.g. 1280 720)")
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.dataset, args.root, args.workers, progress=not args.quiet, cache=args.cache,
                          cache_scale=args.cache_scale)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except io.DataFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"{summary['dataset']}: {summary['labels']} labels ({summary['converted']} converted, "
          f"{summary['skipped']} up to date), {summary['files']} images; stats in {summary['stats']}"
          + (f"; {summary['cached']} files cached in {summary['cache']}" if "cache" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
