"""Rare class sampling (method §6 step 9, DAFormer's RCS).

Class c is drawn with probability softmax((1 − f_c) / T) over the classes that occur in
the source set (f_c = pixel frequency of c over the whole set, T = 0.01); then a file
holding more than ``min_pixels`` pixels of c, uniformly. The caller re-draws the
crop of that file (up to 10 times) until it holds more than ``min_crop_pixels`` of c.

Upstream thresholds are 3000 pixels in a full-resolution label (GTA 1914×1052) and 1500
pixels in a 640×640 crop. :func:`scaled_thresholds` scales both with the pixel area so
that small images (the synthetic set) keep the same *fractions*.
"""
from __future__ import annotations

import numpy as np

REFERENCE_LABEL_AREA = 1914 * 1052
REFERENCE_CROP_AREA = 640 * 640
MIN_PIXELS = 3000
MIN_CROP_PIXELS = 1500


def scaled_thresholds(label_area: float, crop_area: float) -> tuple[int, int]:
    """(min_pixels, min_crop_pixels) scaled from the upstream values by pixel area."""
    return (max(1, round(MIN_PIXELS * label_area / REFERENCE_LABEL_AREA)),
            max(1, round(MIN_CROP_PIXELS * crop_area / REFERENCE_CROP_AREA)))


class RareClassSampler:
    """Draws (class, file index) pairs from per-file class pixel counts ``[N, C]``."""

    def __init__(self, class_counts: np.ndarray, temperature: float = 0.01, min_pixels: int = MIN_PIXELS,
                 min_crop_pixels: int = MIN_CROP_PIXELS):
        counts = np.asarray(class_counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] == 0:
            raise ValueError(f"class_counts: expected a non-empty [files, classes] array, got shape {counts.shape}")
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        totals = counts.sum(0)
        if totals.sum() == 0:
            raise ValueError("class_counts: the source set has no labelled pixels")
        freq = totals / totals.sum()
        self.min_pixels = int(min_pixels)
        self.min_crop_pixels = int(min_crop_pixels)
        self.files_with_class = {c: np.flatnonzero(counts[:, c] > self.min_pixels)
                                 for c in range(counts.shape[1])}
        # Classes absent from the set, or never above the file threshold, cannot be drawn
        # (upstream would fail on an empty file list); they are dropped before the softmax.
        classes = [c for c in range(counts.shape[1]) if totals[c] > 0 and self.files_with_class[c].size]
        if not classes:
            raise ValueError(f"class_counts: no file has more than min_pixels={min_pixels} pixels of any class")
        logits = (1.0 - freq[classes]) / temperature
        prob = np.exp(logits - logits.max())
        self.classes = np.asarray(classes, dtype=np.int64)
        self.class_prob = prob / prob.sum()
        self.class_freq = freq

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        c = int(self.classes[rng.choice(len(self.classes), p=self.class_prob)])
        files = self.files_with_class[c]
        return c, int(files[rng.integers(0, files.size)])
