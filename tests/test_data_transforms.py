"""Per-sample transforms (method §1) and rare class sampling (method §6.9)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sepico_fast.data import rcs as rcs_mod
from sepico_fast.data.labels import MEAN, STD
from sepico_fast.data.transforms import (
    CropWindow,
    crop_is_balanced,
    fit_size,
    normalize,
    plan_crop,
    render_source,
    render_target,
    resize_image,
    resize_label,
)


def test_fit_size_matches_spec():
    assert fit_size(1052, 1914, (1280, 720)) == (704, 1280)     # GTA
    assert fit_size(760, 1280, (1280, 760)) == (760, 1280)      # SYNTHIA
    assert fit_size(1024, 2048, (1280, 640)) == (640, 1280)     # Cityscapes
    assert fit_size(1080, 1920, (1280, 640)) == (640, 1138)     # Dark Zurich
    with pytest.raises(ValueError, match="size"):
        fit_size(0, 10, (4, 4))


def test_nearest_and_bilinear_resize():
    rng = np.random.default_rng(0)
    lbl = rng.integers(0, 19, (37, 61), dtype=np.uint8)
    out = resize_label(lbl, (23, 40))
    ref = F.interpolate(torch.from_numpy(lbl)[None, None].float(), size=(23, 40), mode="nearest")[0, 0]
    np.testing.assert_array_equal(out, ref.numpy().astype(np.uint8))
    img = rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)
    r = resize_image(img, (23, 40))
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(23, 40), mode="bilinear",
                        align_corners=False)[0]
    assert r.dtype == np.uint8 and r.shape == (23, 40, 3)
    assert np.abs(r.astype(np.float32) - ref.permute(1, 2, 0).numpy()).max() <= 0.5 + 2e-3  # float32 ties
    assert resize_image(img, (37, 61)) is img


def test_normalize_table_is_exact():
    img = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)
    ref = (torch.from_numpy(img).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)
    assert torch.equal(normalize(img), ref)


def test_cat_max_ratio_redraws():
    lbl = np.zeros((40, 40), np.uint8)
    lbl[:, 30:] = 1  # only windows reaching x >= 30 see two classes in a balanced way
    assert not crop_is_balanced(lbl[:10, :10], 0.75)
    assert crop_is_balanced(lbl[:10, 25:35], 0.75)
    balanced = 0
    for seed in range(50):
        w = plan_crop(np.random.default_rng(seed), lbl, (10, 10), 0.75)
        balanced += crop_is_balanced(lbl[w.y0:w.y0 + 10, w.x0:w.x0 + 10], 0.75)
    unconstrained = sum(crop_is_balanced(lbl[:10, x:x + 10], 0.75)
                        for x in np.random.default_rng(0).integers(0, 31, 50))
    assert balanced > unconstrained and balanced >= 45


def test_render_source_crop_flip_pad():
    h, w = 12, 20
    xx = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    img = np.stack([xx * 10, xx * 0 + 100, xx * 0 + 200], -1).astype(np.uint8)
    lbl = xx.copy()
    window = CropWindow(2, 5, 8, 6)
    im, gt = render_source(img, lbl, (h, w), window, flip=True, crop=(10, 8))
    assert im.shape == (3, 10, 8) and gt.shape == (1, 10, 8) and gt.dtype == torch.int64
    assert gt[0, 0, :6].tolist() == [10, 9, 8, 7, 6, 5]           # cropped then flipped
    assert (gt[0, 8:] == 255).all() and (gt[0, :, 6:] == 255).all()  # padded bottom/right with 255
    assert (im[:, 8:] == 0).all() and (im[:, :, 6:] == 0).all()     # image padded with 0 after normalising
    back = im[0, 0, :6] * STD[0] + MEAN[0]
    assert torch.allclose(back, torch.tensor([100., 90, 80, 70, 60, 50]), atol=1e-3)
    t = render_target(img, (6, 10), flip=False)
    assert t.shape == (3, 6, 10)


def test_rcs_probabilities_and_thresholds():
    counts = np.zeros((4, 3), np.int64)
    counts[:, 0] = 10000          # frequent class in every file
    counts[1, 1] = 5000           # rare class in one file above the threshold
    counts[2, 1] = 100            # ... and one below it
    counts[3, 2] = 3500
    s = rcs_mod.RareClassSampler(counts, temperature=0.01, min_pixels=3000, min_crop_pixels=1500)
    total = counts.sum(0)
    freq = total / total.sum()
    logits = (1 - freq) / 0.01
    p = np.exp(logits - logits.max())
    p /= p.sum()
    np.testing.assert_allclose(s.class_prob, p)
    rng = np.random.default_rng(0)
    draws = [s.draw(rng) for _ in range(300)]
    assert all(f == 1 for c, f in draws if c == 1) and all(f == 3 for c, f in draws if c == 2)
    assert rcs_mod.scaled_thresholds(1914 * 1052, 640 * 640) == (3000, 1500)
    assert rcs_mod.scaled_thresholds(384 * 216, 128 * 128) == (124, 60)
    with pytest.raises(ValueError, match="class_counts"):
        rcs_mod.RareClassSampler(np.zeros((2, 3)))
