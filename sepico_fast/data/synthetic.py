"""A procedurally generated source/target domain pair in the real on-disk layouts.

``ensure_synthetic()`` generates (once, cached) a GTA-like source (``images/*.png``,
``labels/*.png`` palette PNGs of Cityscapes label ids) and a Cityscapes-like target
(``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``, ``gtFine/.../*_gtFine_labelIds.png``),
then runs ``prepare`` on both so the same readers as for the real datasets load them.

Scenes share one layout model in both domains: a horizon with sky and buildings
(windowed facades) above it, a road in perspective with lane markings, sidewalks with
tiles, parks of terrain with hedges or walls/fences, trees, poles carrying traffic lights
and signs, vehicles of six classes on the road and people on the sidewalks, all scaled by
their depth, drawn far to near. Each class has its own texture (tiles, windows, bricks,
bars, foliage, ...) whose *structure* is the same in both domains; the *appearance* is
shifted in the target: every class colour is rotated in hue and desaturated by its own
amount, textures lose contrast, the scene is darker with a blue colour temperature and a
gamma, and the camera adds blur and sensor noise. See docs/data.md.
"""
from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .labels import CITYSCAPES_TRAIN_TO_ID, cityscapes_id_palette
from .rcs import scaled_thresholds

GENERATOR_VERSION = 2  # bump when the generated data changes (the code hash below also keys the cache)
SOURCE_SIZE = (216, 384)  # (h, w): GTA 1914x1052 at 1/5 of its training scale, 16:9
TARGET_SIZE = (128, 256)  # (h, w): Cityscapes at 1/5 of its 1280x640 training scale
CROP = (128, 128)

SYNTHETIC_DEFAULTS = {
    "source_scale": (256, 144),
    "target_scale": (256, 128),
    "crop_size": CROP,
    "eval_scale": (256, 128),
}
SYNTHETIC_DEFAULTS["rcs_min_pixels"], SYNTHETIC_DEFAULTS["rcs_min_crop_pixels"] = scaled_thresholds(
    SOURCE_SIZE[0] * SOURCE_SIZE[1], CROP[0] * CROP[1])

# Cityscapes label ids used by the painter (train id -> id via CITYSCAPES_TRAIN_TO_ID).
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR,
 TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = CITYSCAPES_TRAIN_TO_ID
EGO, STATIC, DYNAMIC = 1, 4, 5  # not evaluated: become 255 through the id -> train id table

# Source (GTA-like) base colours per label id: plausible, saturated "rendered" colours.
SOURCE_COLOURS = {
    ROAD: (92, 88, 98), SIDEWALK: (168, 156, 146), BUILDING: (152, 118, 96), WALL: (176, 164, 138),
    FENCE: (126, 102, 78), POLE: (112, 112, 120), LIGHT: (44, 44, 48), SIGN: (206, 192, 40),
    VEGETATION: (58, 124, 38), TERRAIN: (134, 166, 72), SKY: (118, 172, 232), PERSON: (156, 58, 72),
    RIDER: (62, 72, 168), CAR: (168, 34, 34), TRUCK: (206, 204, 190), BUS: (226, 178, 40),
    TRAIN: (204, 64, 64), MOTORCYCLE: (52, 52, 64), BICYCLE: (30, 64, 96), EGO: (22, 22, 24),
    STATIC: (104, 92, 82), DYNAMIC: (128, 84, 126),
}


class SyntheticDataError(Exception):
    """The synthetic pair could not be written (a full disk, an unwritable cache folder):
    ``str()`` is one line; the half-written folder is already removed."""


class SyntheticPaths(NamedTuple):
    source: Path  # GTA-like layout
    target: Path  # Cityscapes-like layout


def _default_cache() -> Path:
    env = os.environ.get("SEPICO_FAST_CACHE")
    return Path(env) / "synthetic" if env else Path.home() / ".cache" / "sepico_fast" / "synthetic"


# ----------------------------------------------------------------------------- noise and drawing

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Gaussian noise on a grid of ``cell`` pixels, bilinearly upsampled to [h, w] (unit variance-ish)."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    ys = (np.arange(h, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(w, dtype=np.float32) + 0.5) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bot = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


class _Canvas:
    """Label ids, a shade map (texture detail drawn with objects) and a per-pixel colour tint."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.ids = np.full((h, w), SKY, dtype=np.uint8)
        self.shade = np.zeros((h, w), dtype=np.float32)
        self.tint = np.ones((h, w, 3), dtype=np.float32)
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def box(self, y0, y1, x0, x1):
        """Integer slice bounds clipped to the image (None when empty)."""
        y0, y1 = max(int(round(y0)), 0), min(int(round(y1)), self.h)
        x0, x1 = max(int(round(x0)), 0), min(int(round(x1)), self.w)
        return None if y0 >= y1 or x0 >= x1 else (slice(y0, y1), slice(x0, x1))

    def rect(self, label, y0, y1, x0, x1, tint=None, shade=None):
        b = self.box(y0, y1, x0, x1)
        if b is None:
            return None
        self.ids[b] = label
        self.shade[b] = 0.0 if shade is None else shade
        self.tint[b] = 1.0 if tint is None else tint
        return b

    def ellipse(self, label, cy, cx, ry, rx, tint=None, shade=0.0):
        b = self.box(cy - ry, cy + ry + 1, cx - rx, cx + rx + 1)
        if b is None:
            return
        m = ((self.yy[b] - cy) / max(ry, 0.5)) ** 2 + ((self.xx[b] - cx) / max(rx, 0.5)) ** 2 <= 1.0
        self.ids[b][m] = label
        self.shade[b][m] = shade
        self.tint[b][m] = 1.0 if tint is None else tint


def _vehicle_tint(rng):
    gains = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.35, 0.35, 3)
    return (gains * rng.uniform(0.55, 1.45)).astype(np.float32)


# ----------------------------------------------------------------------------- scene layout

def paint_scene(rng: np.random.Generator, h: int, w: int, ego_hood: bool = False) -> _Canvas:
    """Random street scene: label ids (Cityscapes), shade and tint maps."""
    cv = _Canvas(h, w)
    horizon = h * rng.uniform(0.36, 0.48)
    ground = h - horizon
    vx = w * rng.uniform(0.35, 0.65)
    road_l, road_r = w * rng.uniform(-0.35, 0.12), w * rng.uniform(0.88, 1.35)
    walk = w * rng.uniform(0.12, 0.3)

    def depth_x(x_bottom, t):  # x of a line from the vanishing point to x_bottom, at depth t
        return vx + (x_bottom - vx) * t

    # sky gradient + buildings/walls along the skyline
    x = 0.0
    while x < w:
        bw = w * rng.uniform(0.06, 0.26)
        kind = rng.choice(4, p=[0.6, 0.06, 0.1, 0.24])  # building, gap (sky), wall, tree line
        if kind == 0:
            top = horizon - h * rng.uniform(0.2, 0.5)
            b = cv.rect(BUILDING, top, horizon + 2, x, x + bw, tint=np.float32(rng.uniform(0.7, 1.3)))
            if b is not None:  # window grid in the shade map
                py, px = rng.integers(6, 12), rng.integers(5, 11)
                yy, xx = cv.yy[b] - top, cv.xx[b] - x
                win = ((yy % py) > py * 0.45) & ((xx % px) > px * 0.4) & (yy > 3)
                cv.shade[b] = np.where(win, -0.55, 0.0)
        elif kind == 2:
            cv.rect(WALL, horizon - h * rng.uniform(0.04, 0.1), horizon + 2, x, x + bw)
        elif kind == 3:
            for _ in range(int(rng.integers(2, 5))):
                cv.ellipse(VEGETATION, horizon - h * rng.uniform(0.0, 0.2), x + bw * rng.uniform(0, 1),
                           h * rng.uniform(0.08, 0.2), w * rng.uniform(0.04, 0.1))
        x += bw

    # ground: facade or park on each side of the street, then road and sidewalks
    rows = cv.yy[:, 0] > horizon
    t_rows = np.clip((cv.yy - horizon) / ground, 0, 1)
    left_edge = depth_x(road_l, t_rows)
    right_edge = depth_x(road_r, t_rows)
    outer_l = depth_x(road_l - walk, t_rows)
    outer_r = depth_x(road_r + walk, t_rows)
    below = cv.yy > horizon
    sides = []
    for side, outer_mask in (("l", below & (cv.xx < outer_l)), ("r", below & (cv.xx >= outer_r))):
        facade = rng.random() < 0.5
        sides.append(facade)
        cv.ids[outer_mask] = BUILDING if facade else TERRAIN
        cv.shade[outer_mask] = 0.0
        cv.tint[outer_mask] = 1.0
        if not facade:  # bushes at the far side of the park
            cv.ids[outer_mask & (cv.yy < horizon + ground * rng.uniform(0.1, 0.4))] = VEGETATION
        rng.uniform(0.05, 0.12)  # an unused draw, kept so the generated pair stays as it was
        if not facade and rng.random() < 0.6:  # a fence or a low wall along the park
            edge = outer_l if side == "l" else outer_r
            depth = np.clip((cv.yy - horizon) / ground, 0, 1)
            strip = outer_mask & (np.abs(cv.xx - edge) < 2 + 0.06 * w * depth) & rows[:, None]
            cv.ids[strip] = FENCE if rng.random() < 0.6 else WALL
    walk_mask = below & (cv.xx >= outer_l) & (cv.xx < outer_r)
    cv.ids[walk_mask] = SIDEWALK
    cv.shade[walk_mask] = 0.0
    cv.tint[walk_mask] = 1.0
    road_mask = below & (cv.xx >= left_edge) & (cv.xx < right_edge)
    cv.ids[road_mask] = ROAD
    cv.tint[road_mask] = 1.0
    lane = road_mask & (np.abs(cv.xx - depth_x(vx + (road_r - road_l) * rng.uniform(-0.1, 0.1), t_rows))
                        < 0.6 + 2.5 * t_rows) & ((t_rows ** 0.5 * 9) % 1 < 0.5)
    cv.shade[road_mask] = np.where(lane[road_mask], 1.4, 0.0)

    # objects standing on the ground, drawn far to near
    objects = []
    for _ in range(rng.poisson(4.0)):
        objects.append(("vehicle", rng.uniform(0.08, 1.0)))
    for _ in range(rng.poisson(2.5)):
        objects.append(("person", rng.uniform(0.1, 1.0)))
    for _ in range(rng.poisson(3.0)):
        objects.append(("pole", rng.uniform(0.1, 1.0)))
    for _ in range(rng.poisson(3.5)):
        objects.append(("tree", rng.uniform(0.1, 1.0)))
    for _ in range(rng.poisson(0.8)):
        objects.append(("clutter", rng.uniform(0.1, 1.0)))
    objects.sort(key=lambda o: o[1])
    for kind, t in objects:
        s = t * ground  # pixels per unit height at that depth
        yb = horizon + s
        on_left = rng.random() < 0.5
        wx = (depth_x(road_l - walk * rng.uniform(0.1, 0.9), t) if on_left
              else depth_x(road_r + walk * rng.uniform(0.1, 0.9), t))
        if kind == "vehicle":
            x_road = depth_x(road_l + (road_r - road_l) * rng.uniform(0.1, 0.9), t)
            _vehicle(cv, rng, x_road, yb, s)
        elif kind == "person":
            _person(cv, rng, wx, yb, s, PERSON)
        elif kind == "pole":
            _pole(cv, rng, wx, yb, s)
        elif kind == "tree":
            wx = depth_x((road_l - walk) if on_left else (road_r + walk), t)
            trunk_h, trunk_w = 0.5 * s, max(1.0, 0.05 * s)
            cv.rect(VEGETATION, yb - trunk_h, yb, wx - trunk_w / 2, wx + trunk_w / 2, shade=-0.4)
            cv.ellipse(VEGETATION, yb - trunk_h - 0.25 * s, wx, 0.45 * s, 0.38 * s)
        else:
            cw = 0.15 * s
            cv.rect(STATIC if rng.random() < 0.5 else DYNAMIC, yb - 0.2 * s, yb, wx - cw / 2, wx + cw / 2)
    if ego_hood:
        hood = h * rng.uniform(0.05, 0.1)
        m = cv.yy > h - hood - 0.04 * h * np.cos((cv.xx / w - 0.5) * np.pi)
        cv.ids[m] = EGO
        cv.shade[m] = 0.0
        cv.tint[m] = 1.0
    return cv


def _vehicle(cv: _Canvas, rng, x: float, yb: float, s: float) -> None:
    kind = rng.choice(6, p=[0.78, 0.045, 0.04, 0.015, 0.06, 0.06])
    tint = _vehicle_tint(rng)
    if kind == 0:  # car: body, window band, wheels
        hgt, wid = 0.42 * s, 0.8 * s
        b = cv.rect(CAR, yb - hgt, yb, x - wid / 2, x + wid / 2, tint=tint)
        cv.rect(CAR, yb - hgt * 1.45, yb - hgt + 1, x - wid * 0.32, x + wid * 0.32, tint=tint, shade=-0.65)
        if b is not None:
            for wxc in (x - wid * 0.3, x + wid * 0.3):
                cv.ellipse(CAR, yb - 0.05 * s, wxc, 0.09 * s, 0.09 * s, shade=-0.85)
    elif kind == 1:  # truck: cabin + cargo box with ribs
        hgt, wid = 0.85 * s, 1.1 * s
        cv.rect(TRUCK, yb - hgt, yb, x - wid / 2, x + wid * 0.2, tint=tint)
        b = cv.rect(TRUCK, yb - hgt, yb, x - wid / 2, x + wid * 0.2, tint=tint)
        if b is not None:
            cv.shade[b] = np.where((cv.xx[b] % 5) < 1, -0.4, 0.0)
        cv.rect(TRUCK, yb - hgt * 0.6, yb, x + wid * 0.2, x + wid / 2, tint=tint, shade=-0.2)
    elif kind == 2:  # bus: long box with a window row
        hgt, wid = 0.9 * s, 1.7 * s
        b = cv.rect(BUS, yb - hgt, yb, x - wid / 2, x + wid / 2, tint=tint)
        if b is not None:
            rel = (cv.yy[b] - (yb - hgt)) / max(hgt, 1)
            cv.shade[b] = np.where((rel > 0.15) & (rel < 0.45) & ((cv.xx[b] % 7) > 1), -0.6, 0.0)
    elif kind == 3:  # train / tram: very long, with a stripe
        hgt, wid = 0.95 * s, 2.6 * s
        b = cv.rect(TRAIN, yb - hgt, yb, x - wid / 2, x + wid / 2, tint=tint)
        if b is not None:
            rel = (cv.yy[b] - (yb - hgt)) / max(hgt, 1)
            cv.shade[b] = np.where((rel > 0.55) & (rel < 0.65), 0.7, np.where((rel > 0.2) & (rel < 0.4), -0.5, 0.0))
    else:  # motorcycle or bicycle with a rider
        label = MOTORCYCLE if kind == 4 else BICYCLE
        wid = 0.45 * s
        for wxc in (x - wid * 0.35, x + wid * 0.35):
            cv.ellipse(label, yb - 0.12 * s, wxc, 0.12 * s, 0.12 * s, shade=-0.5 if kind == 4 else 0.3)
        cv.rect(label, yb - 0.3 * s, yb - 0.14 * s, x - wid * 0.35, x + wid * 0.35, tint=tint)
        _person(cv, rng, x, yb - 0.22 * s, s * 0.85, RIDER)


def _person(cv: _Canvas, rng, x: float, yb: float, s: float, label: int) -> None:
    hgt, wid = 0.6 * s, 0.17 * s
    tint = np.float32(rng.uniform(0.6, 1.4))
    cv.rect(label, yb - hgt * 0.45, yb, x - wid * 0.4, x + wid * 0.4, tint=tint, shade=-0.45)  # legs
    cv.rect(label, yb - hgt * 0.85, yb - hgt * 0.45, x - wid / 2, x + wid / 2, tint=tint)  # torso
    cv.ellipse(label, yb - hgt * 0.93, x, hgt * 0.08, wid * 0.3, shade=0.6)  # head


def _pole(cv: _Canvas, rng, x: float, yb: float, s: float) -> None:
    hgt, wid = 1.3 * s, max(1.5, 0.05 * s)
    top = yb - hgt
    cv.rect(POLE, top, yb, x - wid / 2, x + wid / 2)
    kind = rng.choice(3, p=[0.45, 0.4, 0.15])  # light, sign, both
    if kind in (0, 2):
        lh, lw = 0.3 * s, 0.11 * s
        b = cv.rect(LIGHT, top, top + lh, x - lw / 2, x + lw / 2)
        if b is not None:
            lamp = int(rng.integers(0, 3))
            rel = (cv.yy[b] - top) / max(lh, 1)
            on = (rel > lamp / 3 + 0.05) & (rel < (lamp + 1) / 3 - 0.05)
            cv.shade[b] = np.where(on, 1.6, 0.0)
    if kind in (1, 2):
        sy = top + (0.35 * s if kind == 2 else 0.0)
        r = 0.13 * s
        if rng.random() < 0.5:
            cv.ellipse(SIGN, sy + r, x, r, r, shade=0.0)
        else:
            b = cv.rect(SIGN, sy, sy + 2 * r, x - r, x + r)
            if b is not None:
                yy, xx = cv.yy[b] - sy, cv.xx[b] - (x - r)
                border = (yy < 1) | (xx < 1) | (yy > 2 * r - 1) | (xx > 2 * r - 1)
                cv.shade[b] = np.where(border, -0.6, 0.0)


# ----------------------------------------------------------------------------- appearance

class Style(NamedTuple):
    colours: dict            # label id -> RGB (0..255)
    contrast: float          # texture amplitude
    light: tuple             # illumination range (per image)
    temperature: tuple       # RGB gains
    gamma: float
    noise: float             # sensor noise sigma (0..255 units)
    blur: float              # Gaussian blur sigma in pixels (0 = none)


def source_style() -> Style:
    return Style(SOURCE_COLOURS, 1.0, (0.95, 1.1), (1.0, 1.0, 1.0), 1.0, 2.0, 0.0)


def target_style(seed: int = 0) -> Style:
    """Per-class hue rotation (±10..35 degrees) and desaturation; darker, bluish, gamma, blur, noise.

    Strength calibrated with a small CNN (docs/data.md): trained on the source it scores ~70
    mIoU on source images but ~21 on the target; trained on target labels, ~46.
    """
    rng = np.random.default_rng([seed, 7777])
    colours = {}
    for cid, rgb in SOURCE_COLOURS.items():
        hh, ss, vv = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
        shift = rng.uniform(10, 35) / 360.0 * (1 if rng.random() < 0.5 else -1)
        hh = (hh + shift) % 1.0
        ss *= rng.uniform(0.7, 0.95)
        vv = min(1.0, vv * rng.uniform(0.85, 1.1))
        colours[cid] = tuple(255.0 * c for c in colorsys.hsv_to_rgb(hh, ss, vv))
    return Style(colours, 0.8, (0.6, 0.85), (0.9, 0.95, 1.15), 1.1, 5.0, 0.7)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(round(2 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(k[i] * pad[i:i + img.shape[0]] for i in range(2 * radius + 1))
    return sum(k[i] * rows[:, i:i + img.shape[1]] for i in range(2 * radius + 1))


def render(cv: _Canvas, style: Style, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB image of a painted scene in a domain style."""
    h, w = cv.h, cv.w
    white = rng.standard_normal((h, w)).astype(np.float32)
    fine = _smooth_noise(rng, h, w, 2)
    medium = _smooth_noise(rng, h, w, 5)
    coarse = _smooth_noise(rng, h, w, 18)
    yy, xx = cv.yy, cv.xx
    horizon_row = max(1.0, float(np.argmax((cv.ids != SKY).any(axis=1))) or h * 0.4)
    textures = {
        ROAD: 0.12 * white + 0.1 * coarse,
        SIDEWALK: np.where(((xx % 9) < 1) | ((yy % 6) < 1), -0.35, 0.0) + 0.06 * white,
        BUILDING: 0.12 * coarse + 0.05 * white,
        WALL: np.where(((yy % 4) < 1) | (((xx + 4 * ((yy // 4) % 2)) % 8) < 1), -0.3, 0.0) + 0.05 * white,
        FENCE: np.where((xx % 4) < 2, 0.35, -0.35),
        POLE: 0.05 * white,
        LIGHT: 0.05 * white,
        SIGN: 0.05 * white,
        VEGETATION: 0.42 * fine + 0.18 * white,
        TERRAIN: 0.2 * medium + 0.08 * white + 0.1 * np.sin(yy * 1.3),
        SKY: 0.35 * (yy / horizon_row - 0.5) + 0.12 * coarse,
    }
    img = np.zeros((h, w, 3), dtype=np.float32)
    detail = cv.shade.copy()
    for cid in np.unique(cv.ids):
        m = cv.ids == cid
        tex = textures.get(int(cid), 0.06 * white)
        tex = tex[m] if isinstance(tex, np.ndarray) else tex
        base = np.asarray(style.colours[int(cid)], dtype=np.float32)
        img[m] = base * cv.tint[m] * (1.0 + style.contrast * (tex + detail[m]))[:, None]
    light = rng.uniform(*style.light)
    img = img * light * np.asarray(style.temperature, dtype=np.float32)
    img = 255.0 * np.clip(img / 255.0, 0, 1) ** style.gamma
    if style.blur > 0:
        img = _blur(img, style.blur)
    img += style.noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing

_ID_PALETTE = cityscapes_id_palette()


def _save(path: Path, array: np.ndarray, palette: bool = False) -> None:
    if palette:  # indices stored as they are (a conversion to "P" would re-quantise them)
        im = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())
        im.putpalette(_ID_PALETTE)
    else:
        im = Image.fromarray(array)
    im.save(path, format="PNG", compress_level=1)


def _generate(root: Path, seed: int, num_source: int, num_train: int, num_val: int) -> None:
    src, tgt = root / "source", root / "target"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir(parents=True)
    s_style, t_style = source_style(), target_style(seed)
    for i in range(num_source):
        rng = np.random.default_rng([seed, 0, i])
        cv = paint_scene(rng, *SOURCE_SIZE)
        _save(src / "images" / f"{i:05d}.png", render(cv, s_style, rng))
        _save(src / "labels" / f"{i:05d}.png", cv.ids, palette=True)
    for split, count, cities in (("train", num_train, ("synthburg", "pixelstadt")), ("val", num_val, ("rendertown",))):
        for i in range(count):
            rng = np.random.default_rng([seed, 1 if split == "train" else 2, i])
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_000019"
            for sub in ("leftImg8bit", "gtFine"):
                (tgt / sub / split / city).mkdir(parents=True, exist_ok=True)
            cv = paint_scene(rng, *TARGET_SIZE, ego_hood=rng.random() < 0.5)
            _save(tgt / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", render(cv, t_style, rng))
            _save(tgt / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", cv.ids)


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_synthetic(cache_dir: str | os.PathLike | None = None, *, num_source: int = 300,
                     num_target_train: int = 200, num_target_val: int = 60, seed: int = 0) -> SyntheticPaths:
    """Generate the synthetic pair once (cached, versioned) and return its source/target roots.

    The cache folder is ``cache_dir`` or ``$SEPICO_FAST_CACHE/synthetic`` or
    ``~/.cache/sepico_fast/synthetic``; each parameter set gets its own sub-folder, made
    complete (generated and prepared) before it appears under its final name.
    """
    from .preparation import prepare

    for name, value in (("num_source", num_source), ("num_target_train", num_target_train),
                        ("num_target_val", num_target_val)):
        if int(value) < 1:
            raise ValueError(f"{name}: expected at least 1, got {value}")
    params = {"version": GENERATOR_VERSION, "seed": seed, "source": num_source, "train": num_target_train,
              "val": num_target_val, "source_size": SOURCE_SIZE, "target_size": TARGET_SIZE}
    code = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()  # any edit of the generator regenerates
    key = hashlib.sha1((json.dumps(params, sort_keys=True) + code).encode()).hexdigest()[:10]
    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    final = cache / f"v{GENERATOR_VERSION}-{key}"
    paths = SyntheticPaths(final / "source", final / "target")
    stamp = final / "COMPLETE.json"
    _remove_stale_temp_folders(cache)
    if stamp.is_file():
        return paths
    tmp = cache / f"{_TMP_PREFIX}{key}-{os.getpid()}"
    try:
        with _lock(cache / ".lock"):
            if stamp.is_file():  # another process finished it while we waited
                return paths
            shutil.rmtree(tmp, ignore_errors=True)
            _generate(tmp, seed, num_source, num_target_train, num_target_val)
            prepare("gta", tmp / "source", workers=0, progress=False)
            prepare("cityscapes", tmp / "target", workers=0, progress=False)
            (tmp / "COMPLETE.json").write_text(json.dumps(params))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException as exc:  # a full disk, an unwritable folder, an interrupt: no half-written folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise SyntheticDataError(f"cannot write the synthetic data set to {cache}: {reason}; nothing half-written "
                                 "is left: free disk space there, or set $SEPICO_FAST_CACHE to a writable folder "
                                 "with space") from None
    return paths


_TMP_PREFIX = ".tmp-"  # a folder being generated: ``.tmp-<key>-<pid>``


def _write_failure(exc: BaseException) -> str | None:
    """One-line reason of a failed write (OSError, or prepare's write error), None for other exceptions."""
    from .io import os_reason
    from .preparation import PrepareWriteError

    if isinstance(exc, OSError):
        where = exc.filename if exc.filename else None
        return f"{os_reason(exc)}" + (f" ({where})" if where else "")
    if isinstance(exc, PrepareWriteError):
        return str(exc).split("; temp files removed")[0]
    return None


def _remove_stale_temp_folders(cache: Path) -> None:
    """Remove the half-written folders of generations that were killed (their process is gone)."""
    from .io import pid_alive

    try:
        found = list(cache.glob(f"{_TMP_PREFIX}*"))
    except OSError:  # no cache folder (yet), or not a folder: the write below names the problem
        return
    for p in found:
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
