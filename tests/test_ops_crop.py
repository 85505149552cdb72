"""Class-balanced crop ops (torch path) against a slow pixel-by-pixel reference."""
import math

import numpy as np
import pytest
import torch

from sepico_fast import ops
from sepico_fast.ops.upstream import upstream_class_balanced_crop


def slow_window_score(label_map, y0, x0, h, w, num_classes=19, ratio=0.75, ignore=255):
    """method §6.3 score of one window, counting pixel by pixel in Python."""
    counts = {}
    for y in range(y0, y0 + h):
        for x in range(x0, x0 + w):
            v = int(label_map[y][x])
            if v == ignore or not 0 <= v < num_classes:
                continue
            counts[v] = counts.get(v, 0) + 1
    if len(counts) < 2:
        return 0.0
    total = sum(counts.values())
    if max(counts.values()) / total >= ratio:
        return 0.0
    log_sum = 0.0
    for c in sorted(counts):
        if counts[c] > 1:
            log_sum += math.log(counts[c])
    return float(np.float32(log_sum))


def slow_scores_and_best(labels, offsets, h, w, **kw):
    labels, offsets = labels.tolist(), offsets.tolist()
    scores, best = [], []
    for b, windows in enumerate(offsets):
        row = [slow_window_score(labels[b], y0, x0, h, w, **kw) for y0, x0 in windows]
        k_best = 0
        for k, s in enumerate(row):
            if s > row[k_best]:
                k_best = k
        scores.append(row)
        best.append(windows[k_best])
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(best)


def blocky_labels(batch, height, width, block, num_values, generator, ignore_share=0.1):
    coarse = torch.randint(0, num_values, (batch, -(-height // block), -(-width // block)),
                           generator=generator)
    ignore = torch.rand(coarse.shape, generator=generator) < ignore_share
    coarse = torch.where(ignore, 255, coarse)
    return coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :height, :width]


def test_scores_match_slow_reference_on_random_maps():
    g = torch.Generator().manual_seed(0)
    labels = blocky_labels(3, 21, 34, 4, 6, g)
    offsets = ops.sample_crop_offsets(3, 10, (21, 34), (9, 13), generator=g)
    scores = ops.score_crop_windows(labels, offsets, (9, 13), impl="torch")
    best = ops.select_crop_windows(labels, offsets, (9, 13), impl="torch")
    ref_scores, ref_best = slow_scores_and_best(labels, offsets, 9, 13)
    assert scores.dtype == torch.float32 and scores.shape == (3, 10)
    assert (ref_scores > 0).any() and (ref_scores == 0).any()  # both branches exercised
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-6)
    assert best.dtype == torch.int64
    assert torch.equal(best, ref_best)


def test_identical_windows_tie_and_first_wins():
    # Period-4 pattern: windows whose origins differ by multiples of 4 have equal histograms.
    yy, xx = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    labels = ((yy % 4) * 4 + xx % 4).unsqueeze(0).repeat(2, 1, 1)
    offsets = torch.tensor([[[0, 1], [4, 0], [0, 8], [8, 4]],
                            [[3, 3], [0, 0], [4, 4], [7, 7]]])
    scores = ops.score_crop_windows(labels, offsets, 12, impl="torch")
    best = ops.select_crop_windows(labels, offsets, 12, impl="torch")
    ref_scores, ref_best = slow_scores_and_best(labels, offsets, 12, 12)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-6)
    # 12x12 windows of a period-4 map all hold 9 pixels of each of 16 classes: exact ties.
    assert torch.all(scores == scores[0, 0])
    assert best.tolist() == [[0, 1], [3, 3]] == ref_best.tolist()


def test_single_class_image_scores_zero_and_keeps_first_window():
    labels = torch.full((2, 16, 20), 7, dtype=torch.int64)
    offsets = torch.tensor([[[5, 2], [0, 0], [8, 12]], [[1, 1], [2, 2], [3, 3]]])
    scores = ops.score_crop_windows(labels, offsets, (8, 8), impl="torch")
    assert torch.equal(scores, torch.zeros(2, 3))
    assert ops.select_crop_windows(labels, offsets, (8, 8), impl="torch").tolist() == [[5, 2], [1, 1]]


def test_edge_windows_ignore_only_single_pixels_and_ratio_boundary():
    labels = torch.full((1, 8, 32), 255, dtype=torch.int64)
    labels[0, :, 8:16] = 3                      # window 1: class 3 with ignore around it
    labels[0, 0, 16], labels[0, 0, 17] = 1, 2   # window 2: two classes of one pixel each
    labels[0, :, 24:30] = 4                     # window 3: 6 columns of class 4 ...
    labels[0, :, 30:32] = 5                     # ... and 2 of class 5: largest share = 0.75
    offsets = torch.tensor([[[0, 0], [0, 8], [0, 16], [0, 24]]])
    scores = ops.score_crop_windows(labels, offsets, (8, 8), impl="torch")
    ref_scores, _ = slow_scores_and_best(labels, offsets, 8, 8)
    assert scores.tolist() == ref_scores.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    # Just under the ratio: 5 vs 3 columns (0.625) gives log(40) + log(24).
    labels[0, :, 29] = 5
    scores = ops.score_crop_windows(labels, offsets, (8, 8), impl="torch")
    assert scores[0, 3].item() == pytest.approx(math.log(40) + math.log(24), rel=1e-6)
    assert ops.select_crop_windows(labels, offsets, (8, 8), impl="torch").tolist() == [[0, 24]]


def test_ignore_index_inside_class_range_and_out_of_range_labels():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(-1, 9, (2, 12, 15), generator=g)  # -1, 6, 7, 8 are not classes for C=6
    offsets = ops.sample_crop_offsets(2, 7, (12, 15), (6, 7), generator=g)
    scores = ops.score_crop_windows(labels, offsets, (6, 7), num_classes=6, ignore_index=2,
                                    cat_max_ratio=0.5, impl="torch")
    ref, _ = slow_scores_and_best(labels, offsets, 6, 7, num_classes=6, ratio=0.5, ignore=2)
    torch.testing.assert_close(scores, ref, rtol=1e-6, atol=1e-6)


def test_uint8_and_channel_dim_labels_give_same_result():
    g = torch.Generator().manual_seed(1)
    labels = blocky_labels(2, 18, 18, 3, 5, g)
    offsets = ops.sample_crop_offsets(2, 5, 18, 10, generator=g)
    ref = ops.score_crop_windows(labels, offsets, 10, impl="torch")
    assert torch.equal(ops.score_crop_windows(labels.to(torch.uint8), offsets, 10, impl="torch"), ref)
    assert torch.equal(ops.score_crop_windows(labels.unsqueeze(1), offsets, 10, impl="torch"), ref)


def test_out_of_range_offsets_are_clamped():
    g = torch.Generator().manual_seed(2)
    labels = blocky_labels(1, 12, 12, 2, 4, g, ignore_share=0.0)
    offsets = torch.tensor([[[-3, 9], [2, 2]]])
    clamped = torch.tensor([[[0, 6], [2, 2]]])
    assert torch.equal(ops.score_crop_windows(labels, offsets, 6, impl="torch"),
                       ops.score_crop_windows(labels, clamped, 6, impl="torch"))
    best = ops.select_crop_windows(labels, offsets, 6, impl="torch")
    assert best.tolist()[0] in ([0, 6], [2, 2])
    assert torch.equal(ops.crop_batch(labels, offsets[:, 0], 6), labels[:, 0:6, 6:12])


def test_matches_upstream_loop_when_replaying_the_same_windows():
    g = torch.Generator().manual_seed(4)
    labels = blocky_labels(2, 20, 40, 4, 5, g)
    img = torch.randn(2, 3, 20, 40, generator=g)
    offsets = ops.sample_crop_offsets(2, 10, (20, 40), (12, 12), generator=g)
    up_img, up_lbl, up_origin = upstream_class_balanced_crop(img, labels, (12, 12), offsets=offsets)
    best = ops.select_crop_windows(labels, offsets, 12, impl="torch")
    assert torch.equal(best, up_origin)
    assert torch.equal(ops.crop_batch(img, best, 12), up_img)
    assert torch.equal(ops.crop_batch(labels, best, 12), up_lbl)


def test_sample_crop_offsets_range_shape_and_reproducibility():
    g = torch.Generator().manual_seed(5)
    off = ops.sample_crop_offsets(4, 500, (10, 20), (7, 16), generator=g)
    assert off.shape == (4, 500, 2) and off.dtype == torch.int64
    assert set(off[..., 0].unique().tolist()) == {0, 1, 2, 3}      # y0 in [0, H-h]
    assert set(off[..., 1].unique().tolist()) == {0, 1, 2, 3, 4}   # x0 in [0, W-w]
    again = ops.sample_crop_offsets(4, 500, (10, 20), (7, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(off, again)
    full = ops.sample_crop_offsets(2, 3, (8, 8), (8, 8))
    assert torch.equal(full, torch.zeros(2, 3, 2, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (2, 9, 11), (2, 2, 3, 9, 11)])
def test_crop_batch_matches_slicing(shape):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=g)
    offsets = torch.tensor([[1, 4], [3, 0]])
    out = ops.crop_batch(x, offsets, (5, 6))
    expected = torch.stack([x[0, ..., 1:6, 4:10], x[1, ..., 3:8, 0:6]])
    assert torch.equal(out, expected)
    ints = ops.crop_batch(x.to(torch.int64), offsets, (5, 6))
    assert ints.dtype == torch.int64 and torch.equal(ints, expected.to(torch.int64))


def test_bad_arguments_raise_value_errors():
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    offsets = torch.zeros(2, 3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="crop_hw"):
        ops.score_crop_windows(labels, offsets, 9)
    with pytest.raises(ValueError, match="offsets"):
        ops.score_crop_windows(labels, offsets[:1], 4)
    with pytest.raises(ValueError, match="labels"):
        ops.score_crop_windows(labels.float(), offsets, 4)
    with pytest.raises(ValueError, match="impl"):
        ops.score_crop_windows(labels, offsets, 4, impl="triton")
    with pytest.raises(ValueError, match="num_tries"):
        ops.sample_crop_offsets(2, 0, 8, 4)
    with pytest.raises(ValueError, match="crop_hw"):
        ops.sample_crop_offsets(2, 3, (8, 8), (4, 9))
    with pytest.raises(ValueError, match="offsets"):
        ops.crop_batch(labels, offsets, 4)
    with pytest.raises(ValueError, match="generator"):
        ops.sample_crop_offsets(2, 3, 8, 4, generator=torch.Generator(), device="cuda")


@pytest.mark.skipif(ops.EXTENSION_AVAILABLE, reason="checks the error when the extension is missing")
def test_cuda_impl_without_extension_is_a_clear_error():
    labels = torch.zeros(1, 8, 8, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="extension"):
        ops.score_crop_windows(labels, torch.zeros(1, 2, 2, dtype=torch.int64), 4, impl="cuda")
