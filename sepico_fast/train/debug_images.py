"""Debug pictures (PIL, no matplotlib): one PNG per debug iteration, one row per sample.

Columns: source (weak), source (strong), source label, teacher source prediction,
target crop, pseudo label, pseudo weight, mix mask, mixed image, mixed label.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def save_debug_images(vis: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [(name, fn) for name, fn in COLUMNS if name in vis]
    rows = []
    for b in range(vis["source"].shape[0]):
        tiles = [fn(vis[name][b]) for name, fn in cols]
        h = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 2), (0, 0)), constant_values=255) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    (path.parent / "columns.txt").write_text(", ".join(name for name, _ in cols) + "\n")
    return path
