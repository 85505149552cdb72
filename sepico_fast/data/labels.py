"""Class names, palette and the label-id → train-id tables of method §1.

Train ids 0..18 are the 19 Cityscapes evaluation classes; 255 is "ignore".
Every table is a dense lookup array so that a whole label map converts with one
fancy-indexing operation (``lut[label]``).
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
           "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
           "bus", "train", "motorcycle", "bicycle")

PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
           (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
           (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
           (0, 80, 100), (0, 0, 230), (119, 11, 32))

# ImageNet statistics on 0..255 RGB (method §1).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# Cityscapes label id of each train id (from the official Cityscapes label definitions);
# GTA5 palette indices are Cityscapes label ids too.
CITYSCAPES_TRAIN_TO_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# SYNTHIA (RAND_CITYSCAPES) class id → train id; terrain, truck and train never occur.
SYNTHIA_ID_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11,
                       17: 12, 8: 13, 19: 15, 12: 17, 11: 18}
SYNTHIA_MISSING_CLASSES = (9, 14, 16)


# Cityscapes train-set class pixel frequencies (method §7): the authors' Dark Zurich code turns
# them into class weights, with scale 0.05 for training (method §6) and 0.16 at test time.
CITYSCAPES_CLASS_FREQ = (0.36869696, 0.06084986, 0.22824049, 0.00655399, 0.00877272, 0.01227341,
                         0.00207795, 0.0055127, 0.15928651, 0.01157818, 0.04018982, 0.01218957,
                         0.00135122, 0.06994545, 0.00267456, 0.00235192, 0.00232904, 0.00098658,
                         0.00413907)


def log_frequency_weights(scale: float, freq=CITYSCAPES_CLASS_FREQ) -> np.ndarray:
    """w_c = (mean(l) - l_c) / std(l) * scale + 1 with l = log f; std with the n - 1 divisor
    (torch.std). Rarer classes weigh more. float64 [len(freq)]."""
    f = np.asarray(freq, dtype=np.float64)
    if f.ndim != 1 or f.size < 2 or not np.all(np.isfinite(f)) or not np.all(f > 0):
        raise ValueError(f"freq: expected at least two positive class frequencies, got {freq!r}")
    if not np.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    logf = np.log(f)
    return (logf.mean() - logf) / logf.std(ddof=1) * float(scale) + 1.0


def _lut(mapping: dict[int, int], size: int) -> np.ndarray:
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


# uint8 label ids → train ids (Cityscapes labelIds and GTA palette indices).
CITYSCAPES_ID_TO_TRAIN_LUT = _lut({cid: t for t, cid in enumerate(CITYSCAPES_TRAIN_TO_ID)}, 256)
# 16-bit SYNTHIA class ids → train ids (the R channel of the 16-bit label PNG).
SYNTHIA_ID_TO_TRAIN_LUT = _lut(SYNTHIA_ID_TO_TRAIN, 65536)


def cityscapes_ids_to_train_ids(label: np.ndarray) -> np.ndarray:
    """Map a uint8 Cityscapes/GTA label-id map to train ids (uint8, 255 = ignore)."""
    if label.dtype != np.uint8:
        raise ValueError(f"label: expected a uint8 label-id map, got dtype {label.dtype}")
    return CITYSCAPES_ID_TO_TRAIN_LUT[label]


def synthia_ids_to_train_ids(label: np.ndarray) -> np.ndarray:
    """Map SYNTHIA class ids (uint16, the R channel of the 16-bit label PNG) to train ids."""
    if label.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"label: expected a uint8/uint16 SYNTHIA class-id map, got dtype {label.dtype}")
    return SYNTHIA_ID_TO_TRAIN_LUT[label]


def class_pixel_counts(train_ids: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Pixels of each train id (ignore excluded) as int64 [num_classes]."""
    return np.bincount(train_ids.ravel(), minlength=256)[:num_classes].astype(np.int64)


def cityscapes_id_palette() -> list[int]:
    """A flat 768-entry PIL palette giving each Cityscapes label id its class colour (as GTA5 does)."""
    pal = [0] * 768
    for t, cid in enumerate(CITYSCAPES_TRAIN_TO_ID):
        pal[3 * cid:3 * cid + 3] = PALETTE[t]
    return pal
