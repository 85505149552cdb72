"""Text for people: one-line error reasons and per-class IoU tables.

Imports nothing from the package, so every layer may use it (``data`` for its file errors,
``evaluate`` and ``train`` for their tables); callers pass the class names
(``data.labels.CLASSES``).
"""
from __future__ import annotations

from typing import Sequence


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``str(exc)`` (at most ``limit`` characters): enough to
    name a fault in a one-line message without the rest of a long torch error."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line[:limit] if limit is not None else line


def iou_table(iou, class_names: Sequence[str] = (), title: str = "target") -> str:
    """Per-class IoU (%) table of IoUs in [0, 1]; NaN (class absent from prediction and
    ground truth) shown as n/a; classes beyond ``class_names`` are named ``class<i>``."""
    vals = [float(v) for v in iou]
    names = list(class_names)[:len(vals)] + [f"class{i}" for i in range(len(class_names), len(vals))]
    lines = [f"{'class':<16}{'IoU %':>8}"]
    for name, v in zip(names, vals):
        lines.append(f"{name:<16}{'n/a' if v != v else f'{100 * v:.2f}':>8}")
    valid = [v for v in vals if v == v]
    miou = 100 * sum(valid) / len(valid) if valid else float("nan")
    lines.append(f"{'mIoU (' + title + ')':<16}{miou:>8.2f}")
    return "\n".join(lines)
