"""``curves.png``: the training curves of a work dir, drawn from its ``scalars.jsonl``.

Panels: losses, pseudo-label weight q, learning rate, images/s, validation mIoU and, with
``--pseudo-diagnostics``, the class-mean precision / coverage of the teacher's pseudo
labels. matplotlib is optional (the ``plots`` extra); without it the runner says so once
and skips the picture. Only the object-oriented API is used (no pyplot), so drawing from
the trainer never touches a user's backend or global figure state.
"""
from __future__ import annotations

import json
from pathlib import Path

_MISSING_SAID = False


def read_scalars(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{scalar name: [(iteration, value), ...] sorted by iteration}; a later line for the same
    iteration (a resumed run that repeated it) replaces the earlier one."""
    series: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        it = int(row.pop("iter"))
        for k, v in row.items():
            if isinstance(v, (int, float)):
                series.setdefault(k, {})[it] = float(v)
    return {k: sorted(d.items()) for k, d in series.items()}


def _is_loss(name: str) -> bool:
    return name.endswith("_ce") or name.endswith("_contrast")


# (title, selector of the scalar names drawn in the panel, y label)
PANELS = (
    ("losses", _is_loss, "loss"),
    ("pseudo-label weight q", lambda k: k == "pseudo_q", "q"),
    ("learning rate", lambda k: k == "lr", "lr (backbone)"),
    ("throughput", lambda k: k == "images_per_s", "images / s"),
    ("validation mIoU", lambda k: k == "val/miou", "mIoU %"),
    ("pseudo labels vs target (class mean)",
     lambda k: k.startswith("pseudo/") and k.endswith("_mean"), "%"),
)


def plot_curves(series: dict[str, list[tuple[int, float]]], out: str | Path, title: str = "") -> Path:
    """Draw the panels that have data into ``out`` (PNG); raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(t, sorted(k for k in series if pick(k)), y) for t, pick, y in PANELS]
    panels = [p for p in panels if p[1]]
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    for i, (name, keys, ylabel) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for k in keys:
            xs, ys = zip(*series[k])
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, linewidth=1.2, label=k)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    out = Path(out)
    fig.savefig(out)
    return out


def update_curves(work_dir: str | Path, title: str = "") -> Path | None:
    """Redraw ``work_dir/curves.png`` from ``work_dir/scalars.jsonl``; None when skipped."""
    global _MISSING_SAID
    work_dir = Path(work_dir)
    jsonl = work_dir / "scalars.jsonl"
    if not jsonl.is_file():
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not _MISSING_SAID:
            print("curves.png skipped: matplotlib is not installed (pip install matplotlib, or the [plots] extra)")
            _MISSING_SAID = True
        return None
    series = read_scalars(jsonl)
    if not series:
        return None
    return plot_curves(series, work_dir / "curves.png", title)
