"""Charts of the committed benchmark records: ``python -m bench.plot``.

One PNG per device (``docs/img/bench_<device>.png``), one panel per benchmark (per op for
files that hold several), one horizontal bar per implementation and shape: the latest
record of each, median milliseconds on a log axis, coloured by family — sepico_fast's own
implementations, the upstream formulation, ``torch.compile`` of the reference — and
labelled with the time and the speed-up over the upstream row of the same shape.

    python -m bench.plot [--results bench/results] [--out docs/img]

Needs matplotlib (the ``plots`` extra).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict
from pathlib import Path

from bench.record import RESULTS_DIR, speedup_vs_upstream

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "img"
FAMILIES = OrderedDict([("sepico_fast", "#2f6db5"), ("torch.compile", "#e08a1e"), ("upstream", "#8c8c8c")])


def family(impl: str) -> str:
    if impl == "upstream":
        return "upstream"
    if "compile" in impl:
        return "torch.compile"
    return "sepico_fast"


def device_slug(device: str) -> str:
    """``"cpu (AMD EPYC, x86_64, 2 cores, ...)"`` -> ``"cpu"``; ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "_", device.split(" (")[0].lower()).strip("_") or "device"


def load_rows(results: str | Path) -> list[dict]:
    rows = []
    for path in sorted(Path(results).glob("*.json")):
        data = json.loads(path.read_text())
        rows.extend(r for r in data if isinstance(r, dict) and r.get("median_ms"))
    return rows


def _shape_text(shape: dict) -> str:
    if not isinstance(shape, dict):
        return str(shape)
    return " ".join(f"{k}={v}" for k, v in shape.items() if k not in ("op", "dtype"))


def chart_data(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{device slug: {panel title: [bar, ...]}}; a bar is the latest row of one
    (bench, op, impl, device, shape) with ``family``, ``label``, ``ms``, ``speedup``."""
    latest: dict[tuple, dict] = {}
    for r in rows:  # file order = time order: later rows replace earlier ones
        key = (r["bench"], r["impl"], r["device"], json.dumps(r.get("shape"), sort_keys=True))
        latest[key] = r
    kept = list(latest.values())
    out: dict[str, dict[str, list[dict]]] = {}
    for r in kept:
        shape = r.get("shape") or {}
        op = shape.get("op") if isinstance(shape, dict) else None
        panel = r["bench"] + (f" / {op}" if op else "")
        speed = speedup_vs_upstream(r, kept)
        bar = {"impl": r["impl"], "family": family(r["impl"]), "ms": float(r["median_ms"]), "speedup": speed,
               "label": f"{r['impl']}  {_shape_text(shape)}".strip(), "device": r["device"]}
        out.setdefault(device_slug(r["device"]), {}).setdefault(panel, []).append(bar)
    for panels in out.values():
        for bars in panels.values():
            bars.sort(key=lambda b: (b["label"].split("  ", 1)[-1], list(FAMILIES).index(b["family"]), b["impl"]))
    return out


def render(slug: str, panels: dict[str, list[dict]], out_dir: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = sorted(panels)
    cols = 2
    rows = -(-len(names) // cols)
    heights = [max(1.6, 0.42 * max(len(panels[n]) for n in names[i:i + cols]) + 0.9)
               for i in range(0, len(names), cols)]
    fig = Figure(figsize=(15, sum(heights) + 0.8), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    devices = sorted({b["device"] for bars in panels.values() for b in bars})
    fig.suptitle(f"benchmarks on {', '.join(devices)} (latest committed record per row; median ms, log scale)",
                 fontsize=11)
    grid = fig.add_gridspec(rows, cols, height_ratios=heights)
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        bars = panels[name]
        ys = list(range(len(bars)))[::-1]
        ax.barh(ys, [b["ms"] for b in bars], color=[FAMILIES[b["family"]] for b in bars], height=0.7)
        ax.set_yticks(ys, [b["label"] for b in bars], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(min(b["ms"] for b in bars) / 3, max(b["ms"] for b in bars) * 30)
        for y, b in zip(ys, bars):
            text = f"{b['ms']:.3g} ms" + (f"  ({b['speedup']:.2g}x vs upstream)" if b["speedup"] else "")
            ax.text(b["ms"] * 1.1, y, text, va="center", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.legend(handles=[Patch(color=c, label=f) for f, c in FAMILIES.items()], loc="outside lower center",
               ncols=3, fontsize=8)
    out = Path(out_dir) / f"bench_{slug}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of <bench>.json record files")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder the PNGs are written to")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("bench.plot needs matplotlib (pip install matplotlib, or the [plots] extra)") from None
    data = chart_data(load_rows(args.results))
    if not data:
        raise SystemExit(f"--results: no benchmark records in {args.results}")
    written = [render(slug, panels, args.out) for slug, panels in sorted(data.items())]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
