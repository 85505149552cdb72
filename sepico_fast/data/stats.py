"""Per-file class pixel counts written by ``python -m sepico_fast.prepare`` (for rare class sampling).

``ROOT/sample_class_stats.json``::

    {"format": "sepico_fast.sample_class_stats/1", "dataset": "gta", "num_classes": 19,
     "files": {"labels/00001_labelTrainIds.png": {"counts": [19 ints], "size": [h, w]}, ...},
     "class_pixels": [19 ints], "class_frequencies": [19 floats]}

Keys are train-id label paths relative to ROOT (POSIX separators); counts exclude 255.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import io

STATS_FILE = "sample_class_stats.json"
STATS_FORMAT = "sepico_fast.sample_class_stats/1"


def write_stats(root: str | os.PathLike, dataset: str, files: dict[str, dict], num_classes: int = 19) -> Path:
    counts = np.array([v["counts"] for v in files.values()], dtype=np.int64).reshape(-1, num_classes)
    totals = counts.sum(0)
    freq = totals / max(int(totals.sum()), 1)
    doc = {"format": STATS_FORMAT, "dataset": dataset, "num_classes": num_classes,
           "files": dict(sorted(files.items())), "class_pixels": totals.tolist(),
           "class_frequencies": [round(float(f), 8) for f in freq]}
    path = Path(root) / STATS_FILE
    return io.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, separators=(",", ":"))))


def read_stats(root: str | os.PathLike) -> dict | None:
    """The stats document, or None when absent or of another format."""
    path = Path(root) / STATS_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == STATS_FORMAT else None


def counts_for(root: str | os.PathLike, label_paths: list[Path], num_classes: int = 19) -> np.ndarray:
    """int64 [N, C] counts of the given train-id label files, from the stats JSON."""
    doc = read_stats(root)
    if doc is None:
        raise FileNotFoundError(f"{Path(root) / STATS_FILE} not found: run `python -m sepico_fast.prepare` first")
    files = doc["files"]
    out = np.zeros((len(label_paths), num_classes), dtype=np.int64)
    root = Path(root)
    for i, p in enumerate(label_paths):
        key = Path(p).relative_to(root).as_posix()
        if key not in files:
            raise FileNotFoundError(f"{root / STATS_FILE} has no entry for {key}: re-run `python -m sepico_fast.prepare`")
        out[i] = files[key]["counts"]
    return out
