"""Debug pictures (PIL, no matplotlib): one PNG per debug iteration, one row per sample.

Columns: source (weak), source (strong), source label, teacher source prediction,
target crop, pseudo label, pseudo weight, mix mask, mixed image, mixed label. Their titles
are drawn in a header row of the picture itself (and listed in ``columns.txt``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..augment import denormalize

PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)


def _image(t: torch.Tensor) -> np.ndarray:
    return (denormalize(t[None]).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _label(t: torch.Tensor) -> np.ndarray:
    lbl = t.reshape(t.shape[-2:]).long().cpu().numpy()
    out = np.zeros(lbl.shape + (3,), dtype=np.uint8)  # ignore (255) stays black
    ok = lbl < len(PALETTE)
    out[ok] = PALETTE[lbl[ok]]
    return out


def _gray(t: torch.Tensor) -> np.ndarray:
    g = (t.reshape(t.shape[-2:]).float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


COLUMNS = (("source", _image), ("source_strong", _image), ("source_gt", _label), ("source_pseudo", _label),
           ("target", _image), ("pseudo_label", _label), ("pseudo_weight", _gray), ("mix_mask", _gray),
           ("mixed_img", _image), ("mixed_label", _label))
# What the header row says above each column.
TITLES = {"source": "source (weak)", "source_strong": "source (strong)", "source_gt": "source label",
          "source_pseudo": "teacher on source", "target": "target crop", "pseudo_label": "pseudo label",
          "pseudo_weight": "pseudo weight q", "mix_mask": "mix mask", "mixed_img": "mixed image",
          "mixed_label": "mixed label"}
_FONT_PX = 11


def _font():
    try:
        return ImageFont.load_default(size=_FONT_PX)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` pixels (a lone long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(trial, font=font) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def title_row(titles: list[str], widths: list[int]) -> np.ndarray:
    """A white header strip with each title centred (wrapped) above its column."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, t, font, w - 2) for t, w in zip(titles, widths)]
    line_h = _FONT_PX + 3
    header = Image.new("RGB", (sum(widths), line_h * max(len(w) for w in wrapped) + 4), "white")
    draw = ImageDraw.Draw(header)
    x0 = 0
    for lines, w in zip(wrapped, widths):
        for i, line in enumerate(lines):
            x = x0 + max(0, (w - draw.textlength(line, font=font)) / 2)
            draw.text((x, 2 + i * line_h), line, fill="black", font=font)
        x0 += w
    return np.asarray(header)


def save_debug_images(vis: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [(name, fn) for name, fn in COLUMNS if name in vis]
    grid = [[fn(vis[name][b]) for name, fn in cols] for b in range(vis["source"].shape[0])]
    col_w = [max(r[c].shape[1] for r in grid) + 2 for c in range(len(cols))]  # 2 px white gap
    rows = [title_row([TITLES.get(name, name) for name, _ in cols], col_w)]
    for tiles in grid:
        h = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1]), (0, 0)), constant_values=255)
                 for t, w in zip(tiles, col_w)]
        rows.append(np.pad(np.concatenate(tiles, axis=1), ((0, 2), (0, 0), (0, 0)), constant_values=255))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    (path.parent / "columns.txt").write_text(", ".join(name for name, _ in cols) + "\n")
    return path
