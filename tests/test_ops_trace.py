"""The torch paths of sepico_fast.ops trace into one graph: no host syncs, no graph breaks.

torch.compile(fullgraph=True) refuses any op that needs a value on the host (``.item()``,
``.tolist()``, ``nonzero``, data-dependent shapes); the ``eager`` backend only traces, so
this runs in a few seconds on the CPU.
"""
import torch

from sepico_fast import ops


def self_training_pixel_ops(src_lbl, tgt_img, logits, offsets, mix):
    prob, label, q = ops.pseudo_label(logits, impl="torch")
    best = ops.select_crop_windows(label, offsets, (8, 8), impl="torch")
    scores = ops.score_crop_windows(label, offsets, (8, 8), impl="torch")
    img_crop = ops.crop_batch(tgt_img, best, (8, 8))
    lbl_crop = ops.crop_batch(label, best, (8, 8))
    weight = q * torch.ones(lbl_crop.shape, dtype=torch.float32)
    mixed = ops.classmix(img_crop.flip(-1), img_crop, src_lbl, lbl_crop, weight, mix, impl="torch")
    return (*mixed, scores, q)


def test_pixel_ops_trace_without_graph_breaks():
    g = torch.Generator().manual_seed(0)
    src_lbl = torch.randint(0, 6, (2, 1, 8, 8), generator=g)
    tgt_img = torch.randn(2, 3, 12, 16, generator=g)
    logits = 4 * torch.randn(2, 19, 12, 16, generator=g)
    offsets = ops.sample_crop_offsets(2, 10, (12, 16), (8, 8), generator=g)
    mix = ops.choose_mix_classes(src_lbl, g)
    compiled = torch.compile(self_training_pixel_ops, backend="eager", fullgraph=True)
    got = compiled(src_lbl, tgt_img, logits, offsets, mix)
    expected = self_training_pixel_ops(src_lbl, tgt_img, logits, offsets, mix)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_random_choices_trace_without_graph_breaks():
    src_lbl = torch.tensor([[[[0, 3], [3, 255]]], [[[7, 7], [300, -4]]]])
    choose = torch.compile(ops.choose_mix_classes, backend="eager", fullgraph=True)
    mix = choose(src_lbl)
    assert mix.shape == (2, 256) and torch.all(mix.sum(1) == 2)
    sample = torch.compile(lambda: ops.sample_crop_offsets(2, 10, (12, 16), (8, 8)),
                           backend="eager", fullgraph=True)
    offsets = sample()
    assert offsets.shape == (2, 10, 2)
    assert offsets[..., 0].max() <= 4 and offsets[..., 1].max() <= 8 and offsets.min() >= 0
