"""``python -m sepico_fast.prepare {gta,synthia,cityscapes,darkzurich,acdc} ROOT [--check]``.

The command line of ``sepico_fast.data.preparation`` (the logic lives there): writes the
train-id maps and ``ROOT/sample_class_stats.json``, or with ``--check`` verifies a
prepared dataset without writing. Exit status: 0 fine; 1 bad files (every one listed, one
line each) or a file it cannot write (a full disk, a read-only folder: one line; its temp
files removed); 2 a folder without the expected layout (one line naming it and the
layout); 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from .data.cache import CACHE_FORMATS
from .data.layouts import DATASETS, LayoutError
from .data.preparation import BadFilesError, PrepareWriteError, check, prepare

__all__ = ["main", "prepare", "check"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sepico_fast.prepare", description=(
        "Write *_labelTrainIds.png next to every label and ROOT/sample_class_stats.json (run once per "
        "dataset); every image and label is decoded in full and every bad file is listed."))
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("root", help="dataset folder in its official layout")
    parser.add_argument("--check", action="store_true",
                        help="only verify a prepared dataset (decode every file, check label values and the "
                             "class statistics); writes nothing")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--cache", choices=CACHE_FORMATS, default=None,
                        help="also write images pre-resized to the training scale (png: lossless, identical "
                             "batches; jpeg: smaller, GPU-decodable by DALI, lossy); the training code reads "
                             "them through build_datasets(cache=...) (there is no trainer flag for it)")
    parser.add_argument("--cache-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                        help="scale of the cached copies (default: the dataset's training scale, e.g. 1280 720)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            summary = check(args.dataset, args.root, args.workers, progress=not args.quiet)
        else:
            summary = prepare(args.dataset, args.root, args.workers, progress=not args.quiet, cache=args.cache,
                              cache_scale=args.cache_scale)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BadFilesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PrepareWriteError as exc:  # a full disk or a read-only folder: one line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.check:
        print(f"{summary['dataset']}: {summary['files']} images and {summary['labels']} labels in "
              f"{summary['root']} are intact")
        return 0
    print(f"{summary['dataset']}: {summary['labels']} labels ({summary['converted']} converted, "
          f"{summary['skipped']} up to date), {summary['files']} images; stats in {summary['stats']}"
          + (f"; {summary['cached']} files cached in {summary['cache']}" if "cache" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
