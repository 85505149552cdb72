"""ClassMix ops (torch path) against a slow pixel-by-pixel reference and the upstream loop."""
import numpy as np
import pytest
import torch

from sepico_fast import ops
from sepico_fast.ops.upstream import upstream_classmix


def slow_classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix_classes):
    """mask·src + (1−mask)·tgt pixel by pixel, mask from the 256-entry class table."""
    batch, channels, height, width = src_img.shape
    img = torch.empty_like(src_img)
    lbl = torch.empty(batch, 1, height, width, dtype=torch.int64)
    weight = torch.empty(batch, 1, height, width, dtype=tgt_weight.dtype)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                v = int(src_lbl[b, 0, y, x])
                m = 1 if 0 <= v < 256 and bool(mix_classes[b, v]) else 0
                for c in range(channels):
                    img[b, c, y, x] = m * src_img[b, c, y, x] + (1 - m) * tgt_img[b, c, y, x]
                lbl[b, 0, y, x] = m * v + (1 - m) * int(tgt_lbl[b, y, x])
                weight[b, 0, y, x] = m * 1.0 + (1 - m) * float(tgt_weight[b, y, x])
    return img, lbl, weight


def make_inputs(seed, batch=2, height=5, width=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([0, 1, 2, 5, 255, 300, -1])  # 300 and -1 lie outside the class table
    src_lbl = values[torch.randint(0, len(values), (batch, 1, height, width), generator=g)]
    tgt_lbl = torch.randint(0, 19, (batch, height, width), generator=g)
    src_img = torch.randn(batch, 3, height, width, generator=g).to(dtype)
    tgt_img = torch.randn(batch, 3, height, width, generator=g).to(dtype)
    tgt_weight = torch.rand(batch, height, width, generator=g)
    return src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight


def test_classmix_matches_slow_reference_with_ignore_label_chosen():
    src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight = make_inputs(0)
    mix = torch.zeros(2, 256, dtype=torch.bool)
    mix[0, [0, 5, 255]] = True   # sample 0 takes the ignore label from the source (quirk)
    mix[1, [1, 2]] = True
    out = ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix, impl="torch")
    ref = slow_classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix)
    for got, expected in zip(out, ref):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
    mixed_lbl = out[1]
    assert (mixed_lbl[0] == 255).any()                          # 255 copied from the source
    assert not (mixed_lbl[1] == 255).any()                       # not chosen for sample 1
    assert not ((mixed_lbl == 300) | (mixed_lbl == -1)).any()    # never mixed in


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_classmix_half_precision_is_an_exact_select(dtype):
    src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight = make_inputs(1, dtype=dtype)
    mix = ops.choose_mix_classes(src_lbl, torch.Generator().manual_seed(0))
    img, _, _ = ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix, impl="torch")
    mask = ops.mix_mask(src_lbl, mix)
    assert img.dtype == dtype
    assert torch.equal(img, torch.where(mask, src_img, tgt_img))


def test_choose_mix_classes_picks_half_rounded_up_of_the_batch_classes():
    src_lbl = torch.tensor([[[[0, 3], [3, 255]]], [[[7, 7], [300, -4]]]])  # present: 0,3,7,255
    g = torch.Generator().manual_seed(2)
    mix = ops.choose_mix_classes(src_lbl, g)
    assert mix.shape == (2, 256) and mix.dtype == torch.bool
    present = {0, 3, 7, 255}
    for row in mix:
        chosen = set(torch.arange(256)[row].tolist())
        assert len(chosen) == 2 and chosen <= present  # ceil(4/2), whole-batch class set
    odd = torch.tensor([[[[1, 2, 9]]]])
    assert ops.choose_mix_classes(odd, g).sum().item() == 2  # ceil(3/2)
    again = ops.choose_mix_classes(src_lbl, torch.Generator().manual_seed(2))
    assert torch.equal(mix, again)


def test_choose_mix_classes_is_uniform_over_subsets():
    # Three classes present (incl. 255) -> two chosen; each of the three pairs ~1/3 of samples.
    src_lbl = torch.tensor([4, 9, 255]).view(1, 1, 1, 3).expand(3000, 1, 1, 3)
    mix = ops.choose_mix_classes(src_lbl, torch.Generator().manual_seed(3))
    assert torch.all(mix.sum(1) == 2)
    pairs = mix[:, [4, 9, 255]].long()
    left_out = (1 - pairs).argmax(1)  # which of the three was not chosen
    freq = torch.bincount(left_out, minlength=3).float() / 3000
    assert torch.all((freq - 1 / 3).abs() < 0.04), freq


def test_matches_upstream_loop_for_the_same_class_choice():
    src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight = make_inputs(4, height=6, width=6)
    src_lbl = src_lbl.clamp(0, 255)  # upstream's mask needs in-table labels
    up_img, up_lbl, up_weight, chosen = upstream_classmix(
        src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, rng=np.random.default_rng(0))
    mix = torch.zeros(2, 256, dtype=torch.bool)
    for b, classes in enumerate(chosen):
        mix[b, classes] = True
    img, lbl, weight = ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix, impl="torch")
    torch.testing.assert_close(img, up_img, rtol=0, atol=0)
    assert torch.equal(lbl, up_lbl)
    torch.testing.assert_close(weight, up_weight, rtol=0, atol=0)


def test_classmix_bad_arguments_raise_value_errors():
    src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight = make_inputs(5)
    mix = torch.zeros(2, 256, dtype=torch.bool)
    with pytest.raises(ValueError, match="mix_classes"):
        ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix[:, :19])
    with pytest.raises(ValueError, match="mix_classes"):
        ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix.long())
    with pytest.raises(ValueError, match="tgt_img"):
        ops.classmix(src_img, tgt_img[:, :, :4], src_lbl, tgt_lbl, tgt_weight, mix)
    with pytest.raises(ValueError, match="tgt_lbl"):
        ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl[:1], tgt_weight, mix)
    with pytest.raises(ValueError, match="src_lbl"):
        ops.classmix(src_img, tgt_img, src_lbl.float(), tgt_lbl, tgt_weight, mix)


def test_float64_weight_never_goes_through_the_fp32_kernel(monkeypatch):
    """The CUDA kernel takes an fp32 weight; a float64 weight (or image) must stay on the
    torch path, whose values it keeps exactly. The dispatcher is forced to "cuda" here, so
    reaching the kernel would fail on this CPU-only machine."""
    import importlib

    classmix_module = importlib.import_module("sepico_fast.ops.classmix")  # not the function
    src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight = make_inputs(4)
    weight64 = tgt_weight.double() / 3.0  # not representable in fp32
    mix = ops.choose_mix_classes(src_lbl, torch.Generator().manual_seed(2))
    expected = ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, weight64, mix, impl="torch")
    monkeypatch.setattr(classmix_module, "resolve_impl", lambda *args: "cuda")
    got = ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, weight64, mix)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)
    got = ops.classmix(src_img.double(), tgt_img.double(), src_lbl, tgt_lbl, tgt_weight, mix)
    assert got[0].dtype == torch.float64
