"""downscale_label_ratio and prepare_contrast against the upstream recipe written here."""
import pytest
import torch
import torch.nn.functional as F

from sepico_fast.contrast import downscale_label_ratio, prepare_contrast

IGNORE = 255


def recipe(label, s, min_ratio, num_classes):
    """method §3 literally: 255 -> C, one-hot C+1, average pool (k = stride = s), arg-max and
    its fraction, 255 where the arg-max is the ignore channel or the fraction < min_ratio."""
    x = label[:, 0].clone()
    x[x == IGNORE] = num_classes
    onehot = F.one_hot(x, num_classes + 1).permute(0, 3, 1, 2).double()
    pooled = F.avg_pool2d(onehot, kernel_size=s, stride=s)
    fraction, top = pooled.max(dim=1, keepdim=True)
    # torch.max on ties is unspecified; pick the first maximal channel explicitly.
    top = (pooled == fraction).double().argmax(dim=1, keepdim=True)
    out = top.clone()
    out[(top == num_classes) | (fraction < min_ratio)] = IGNORE
    return out


def blocky_labels(b, h, w, s, num_classes, seed):
    """Mostly uniform s x s blocks with noise and ignore, so every branch is exercised."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (b, 1, h // s, w // s), generator=g)
    label = coarse.repeat_interleave(s, 2).repeat_interleave(s, 3)
    noise = torch.rand(label.shape, generator=g)
    label = torch.where(noise < 0.15, torch.randint(0, num_classes, label.shape, generator=g), label)
    return torch.where(noise > 0.9, torch.full_like(label, IGNORE), label)


@pytest.mark.parametrize("s", [2, 4, 8])
@pytest.mark.parametrize("min_ratio", [0.75, 0.5, 0.0, 1.0])
def test_matches_one_hot_average_pool_recipe(s, min_ratio):
    label = blocky_labels(2, 32, 48, s, 5, seed=s)
    got = downscale_label_ratio(label, s, min_ratio, num_classes=5)
    want = recipe(label, s, min_ratio, 5)
    assert got.dtype == torch.int64 and got.shape == (2, 1, 32 // s, 48 // s)
    assert torch.equal(got, want)
    kept = got != IGNORE
    if min_ratio < 1.0:
        assert kept.any()
    if min_ratio >= 0.75:
        assert (~kept).any()  # the min-ratio branch occurs too


def test_c19_and_integer_dtypes():
    label = blocky_labels(1, 64, 64, 4, 19, seed=1)
    want = recipe(label, 4, 0.75, 19)
    for dtype in (torch.uint8, torch.int32, torch.int64):
        assert torch.equal(downscale_label_ratio(label.to(dtype), 4), want)


def test_hand_example():
    label = torch.tensor([[0, 0, 1, 1],
                          [0, 1, 1, 1],
                          [255, 255, 2, 2],
                          [255, 3, 2, 255]])[None, None]
    got = downscale_label_ratio(label, 2, 0.75, num_classes=4)
    # top-left: 0 with 3/4 -> 0; top-right: 1 with 4/4 -> 1;
    # bottom-left: ignore channel wins -> 255; bottom-right: 2 with 3/4 -> 2.
    assert got[0, 0].tolist() == [[0, 1], [255, 2]]
    got = downscale_label_ratio(label, 2, 0.8, num_classes=4)
    assert got[0, 0].tolist() == [[255, 1], [255, 255]]
    # Tie between class 0 (2/4) and the ignore channel (2/4): the class wins.
    tie = torch.tensor([[0, 255], [255, 0]])[None, None]
    assert downscale_label_ratio(tie, 2, 0.5, num_classes=2).item() == 0


def test_scale_one_is_identity():
    label = blocky_labels(2, 6, 10, 1, 4, seed=3)
    out = downscale_label_ratio(label.int(), 1, 0.75, num_classes=4)
    assert out.dtype == torch.int64 and torch.equal(out, label)


@pytest.mark.parametrize("h, w, s", [(37, 50, 4), (48, 40, 8), (45, 43, 8), (9, 30, 2)])
def test_sizes_not_multiple_of_scale_drop_trailing_rows(h, w, s):
    """method §3: the trailing rows/columns that do not fill an s x s window are dropped
    (average pooling's floor), as the upstream one-hot + avg_pool2d recipe does."""
    full = blocky_labels(2, -(-h // s) * s, -(-w // s) * s, s, 19, seed=h * w)
    label = full[:, :, :h, :w].contiguous()
    got = downscale_label_ratio(label, s, 0.75)
    want = recipe(label, s, 0.75, 19)
    assert got.shape == (2, 1, h // s, w // s) == want.shape
    assert torch.equal(got, want)
    # The dropped pixels do not matter: changing them leaves the result alone.
    other = label.clone()
    other[:, :, (h // s) * s:] = 3
    other[:, :, :, (w // s) * s:] = 255
    assert torch.equal(downscale_label_ratio(other, s, 0.75), got)


def test_validation():
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    assert downscale_label_ratio(label, 3).shape == (1, 1, 2, 2)  # 8 // 3: floor, no error
    with pytest.raises(ValueError, match="smaller than one scale=9 window"):
        downscale_label_ratio(label, 9)
    with pytest.raises(ValueError, match="scale"):
        downscale_label_ratio(label, 0)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        downscale_label_ratio(label[0], 2)
    with pytest.raises(ValueError, match="integer"):
        downscale_label_ratio(label.float(), 2)
    bad = label.clone()
    bad[0, 0, 0, 0] = 19
    with pytest.raises(ValueError, match="0..18"):
        downscale_label_ratio(bad, 2)


def test_prepare_contrast_order_and_labels():
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(2, 7, 3, 5, generator=g)
    label = blocky_labels(2, 12, 20, 4, 6, seed=5)
    feat, labels = prepare_contrast(proj, label, num_classes=6)
    small = recipe(label, 4, 0.75, 6)
    assert feat.shape == (30, 7) and labels.shape == (30,) and labels.dtype == torch.int64
    i = 0
    for b in range(2):
        for h in range(3):
            for w in range(5):
                assert torch.equal(feat[i], proj[b, :, h, w])
                assert labels[i] == small[b, 0, h, w]
                i += 1
    assert (labels == IGNORE).any()  # ignore pixels are kept, not dropped
    # Same resolution: s = 1.
    feat1, labels1 = prepare_contrast(proj, label[:, :, ::4, ::4], num_classes=6)
    assert torch.equal(labels1, label[:, :, ::4, ::4].reshape(-1))
    with pytest.raises(ValueError, match="does not downscale to the feature size 3x5"):
        prepare_contrast(proj, label[:, :, :11], num_classes=6)
    with pytest.raises(ValueError, match="batch"):
        prepare_contrast(proj[:1], label, num_classes=6)


def test_prepare_contrast_label_not_multiple_of_features():
    """s = label width // feature width (method §3): a 15x22 label over 3x5 features has s = 4
    and its downscaled 3x5 map (trailing rows/columns dropped) lines up with the features."""
    g = torch.Generator().manual_seed(6)
    proj = torch.randn(2, 4, 3, 5, generator=g)
    label = blocky_labels(2, 16, 24, 4, 6, seed=6)[:, :, :15, :22].contiguous()
    feat, labels = prepare_contrast(proj, label, num_classes=6)
    assert torch.equal(labels, recipe(label, 4, 0.75, 6).reshape(-1))
    assert torch.equal(feat, proj.permute(0, 2, 3, 1).reshape(-1, 4))
    with pytest.raises(ValueError, match="does not downscale"):  # s = 22 // 6 = 3 gives 5x7, not 3x6
        prepare_contrast(torch.randn(2, 4, 3, 6), label, num_classes=6)
