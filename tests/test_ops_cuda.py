"""GPU checks: the CUDA extension against the torch fallbacks, no host syncs, torch.compile.

Every test here needs a CUDA device; the extension tests also need sepico_fast.ops._C
(built by ``pip install --no-build-isolation -e .`` with a CUDA torch and nvcc).
"""
import pytest
import torch

from sepico_fast import ops

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_ext = pytest.mark.skipif(not (torch.cuda.is_available() and ops.EXTENSION_AVAILABLE),
                               reason=f"needs a CUDA GPU and the CUDA extension "
                                      f"(extension {ops.EXTENSION_STATUS})")
DEV = "cuda"


def blocky_labels(batch, height, width, block, num_values, generator):
    coarse = torch.randint(0, num_values, (batch, -(-height // block), -(-width // block)),
                           generator=generator)
    coarse = torch.where(torch.rand(coarse.shape, generator=generator) < 0.1, 255, coarse)
    return coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :height, :width]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_crop_scores_extension_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    cases = [
        (blocky_labels(3, 70, 131, 6, 8, g), (40, 64), 10),
        (torch.full((2, 32, 32), 4), (16, 16), 6),                      # one class: all zero
        (torch.full((2, 32, 64), 255), (16, 16), 5),                    # only ignore
        (blocky_labels(2, 640, 1280, 32, 19, g), (640, 640), 10),      # training size
    ]
    for labels, crop, k in cases:
        labels = labels.to(dtype).to(DEV)
        offsets = ops.sample_crop_offsets(labels.shape[0], k, tuple(labels.shape[-2:]), crop,
                                          generator=g).to(DEV)
        offsets[0, 0] = torch.tensor([-5, 10**6])  # clamped by both implementations
        ref = ops.score_crop_windows(labels, offsets, crop, impl="torch")
        got = ops.score_crop_windows(labels, offsets, crop, impl="cuda")
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(ops.select_crop_windows(labels, offsets, crop, impl="cuda"),
                           ops.select_crop_windows(labels, offsets, crop, impl="torch"))


@needs_ext
def test_crop_ties_extension_keeps_first_window():
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    labels = ((yy % 4) * 4 + xx % 4).expand(2, 48, 48).contiguous().to(DEV)
    offsets = torch.tensor([[[4, 0], [0, 4], [8, 8]], [[1, 2], [5, 6], [9, 10]]], device=DEV)
    scores = ops.score_crop_windows(labels, offsets, 24, impl="cuda")
    assert torch.all(scores == scores[0, 0]) and scores[0, 0] > 0
    assert ops.select_crop_windows(labels, offsets, 24, impl="cuda").tolist() == [[4, 0], [1, 2]]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_classmix_extension_matches_torch(dtype):
    g = torch.Generator(device=DEV).manual_seed(1)
    src_lbl = torch.randint(0, 24, (2, 1, 160, 320), device=DEV, generator=g)
    src_lbl = torch.where(src_lbl == 23, 255, torch.where(src_lbl == 22, 300, src_lbl))
    args = (torch.randn(2, 3, 160, 320, device=DEV, generator=g).to(dtype),
            torch.randn(2, 3, 160, 320, device=DEV, generator=g).to(dtype),
            src_lbl, torch.randint(0, 19, (2, 160, 320), device=DEV, generator=g),
            torch.rand(2, 160, 320, device=DEV, generator=g),
            ops.choose_mix_classes(src_lbl, g))
    for got, ref in zip(ops.classmix(*args, impl="cuda"), ops.classmix(*args, impl="torch")):
        assert got.dtype == ref.dtype and torch.equal(got, ref)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pseudo_label_extension_matches_torch(dtype):
    g = torch.Generator(device=DEV).manual_seed(2)
    scale = 10 * torch.rand(2, 1, 160, 320, device=DEV, generator=g)
    logits = (scale * torch.randn(2, 19, 160, 320, device=DEV, generator=g)).to(dtype)
    prob, label, q = ops.pseudo_label(logits, impl="cuda")
    ref_prob, ref_label, ref_q = ops.pseudo_label(logits, impl="torch")
    torch.testing.assert_close(prob, ref_prob, rtol=2e-6, atol=2e-7)
    assert (label != ref_label).float().mean().item() < 1e-4  # only near-equal logits may differ
    near = ((ref_prob - 0.968).abs() < 1e-5).sum().item()
    assert abs(q.item() - ref_q.item()) <= (near + 0.5) / ref_prob.numel()
    assert q.shape == () and q.dtype == torch.float32


@needs_gpu
@pytest.mark.parametrize("impl", ["torch", "cuda"])
def test_no_host_sync_on_gpu(impl):
    if impl == "cuda" and not ops.EXTENSION_AVAILABLE:
        pytest.skip(f"CUDA extension {ops.EXTENSION_STATUS}")
    g = torch.Generator(device=DEV).manual_seed(3)
    logits = torch.randn(2, 19, 64, 128, device=DEV, generator=g)
    src_img = torch.randn(2, 3, 64, 64, device=DEV, generator=g)
    src_lbl = torch.randint(0, 19, (2, 1, 64, 64), device=DEV, generator=g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        prob, label, q = ops.pseudo_label(logits, impl=impl)
        offsets = ops.sample_crop_offsets(2, 10, (64, 128), (64, 64), generator=g)
        best = ops.select_crop_windows(label, offsets, (64, 64), impl=impl)
        tgt_img = ops.crop_batch(torch.randn(2, 3, 64, 128, device=DEV, generator=g), best, 64)
        tgt_lbl = ops.crop_batch(label, best, 64)
        weight = q * torch.ones(tgt_lbl.shape, device=DEV)
        mix = ops.choose_mix_classes(src_lbl, g)
        ops.classmix(src_img, tgt_img, src_lbl, tgt_lbl, weight, mix, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_ext
def test_custom_ops_compile_fullgraph():
    def step(labels, offsets, logits, src_img, src_lbl, mix):
        prob, label, q = ops.pseudo_label(logits, impl="cuda")
        scores = ops.score_crop_windows(labels, offsets, 32, impl="cuda")
        best = ops.select_crop_windows(labels, offsets, 32, impl="cuda")
        weight = q * torch.ones(src_lbl.shape, device=src_lbl.device)
        mixed = ops.classmix(src_img, src_img.flip(-1), src_lbl, src_lbl[:, 0], weight, mix,
                             impl="cuda")
        return (prob, label, q, scores, best, *mixed)

    g = torch.Generator(device=DEV).manual_seed(4)
    args = (torch.randint(0, 19, (2, 64, 96), device=DEV, generator=g),
            torch.randint(0, 32, (2, 10, 2), device=DEV, generator=g),
            torch.randn(2, 19, 32, 32, device=DEV, generator=g),
            torch.randn(2, 3, 32, 32, device=DEV, generator=g),
            torch.randint(0, 19, (2, 1, 32, 32), device=DEV, generator=g),
            torch.rand(2, 256, device=DEV, generator=g) < 0.5)
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@needs_ext
def test_custom_ops_pass_opcheck():
    """Schema, fake (shape) functions and dispatch registration of each custom op."""
    g = torch.Generator(device=DEV).manual_seed(5)
    labels = torch.randint(0, 19, (2, 48, 64), device=DEV, generator=g)
    offsets = torch.randint(0, 16, (2, 10, 2), device=DEV, generator=g)
    torch.library.opcheck(torch.ops.sepico_fast.crop_window_scores.default,
                          (labels, offsets, 32, 32, 19, 0.75, 255))
    src_lbl = torch.randint(0, 19, (2, 1, 16, 16), device=DEV, generator=g)
    torch.library.opcheck(torch.ops.sepico_fast.classmix.default,
                          (torch.randn(2, 3, 16, 16, device=DEV, generator=g),
                           torch.randn(2, 3, 16, 16, device=DEV, generator=g), src_lbl,
                           torch.randint(0, 19, (2, 1, 16, 16), device=DEV, generator=g),
                           torch.rand(2, 1, 16, 16, device=DEV, generator=g),
                           torch.rand(2, 256, device=DEV, generator=g) < 0.5))
    torch.library.opcheck(torch.ops.sepico_fast.pseudo_label.default,
                          (torch.randn(2, 19, 16, 16, device=DEV, generator=g), 0.968))
