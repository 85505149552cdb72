"""The DALI graph (CPU-only mode, device_id=None) renders the same batches as the torch pipeline.

Labels (nearest neighbour) must be identical; images may differ by one uint8 level where
DALI's bilinear weights round differently, i.e. by at most 1/std_c ≤ 0.0175 after
normalising, on a small fraction of the pixels (the same bound holds for target images).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from sepico_fast.data import STD, TrainLoader, build_datasets

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")

IMG_TOL = 1.0 / min(STD) + 1e-5   # one uint8 level after normalising
IMG_FRAC = 0.08                   # share of image values allowed to differ at all


def _compare(loader_args, iters=3):
    torch_batches = list(TrainLoader(*loader_args, num_iters=iters, pipeline="torch"))
    dali_batches = list(TrainLoader(*loader_args, num_iters=iters, pipeline="dali", num_workers=2))
    assert len(torch_batches) == len(dali_batches) == iters
    for (s1, t1), (s2, t2) in zip(torch_batches, dali_batches):
        assert s1["img"].shape == s2["img"].shape and s1["gt"].shape == s2["gt"].shape
        assert s2["gt"].dtype == torch.int64 and s2["img"].dtype == torch.float32
        assert torch.equal(s1["gt"], s2["gt"])            # same crops, flips, padding, nearest resize
        diff = (s1["img"] - s2["img"]).abs()
        assert diff.max() <= IMG_TOL and (diff > 1e-5).float().mean() < IMG_FRAC
        assert set(t1) == set(t2)
        for k in t1:
            diff = (t1[k] - t2[k]).abs()
            assert t1[k].shape == t2[k].shape and diff.max() <= IMG_TOL and (diff > 1e-5).float().mean() < IMG_FRAC
    return torch_batches


def test_dali_cpu_matches_torch_on_synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synthetic")
    src, tgt, _ = build_datasets("synthetic", "synthetic", synthetic_cache=cache,
                                 synthetic_options={"num_source": 12, "num_target_train": 6, "num_target_val": 2})
    _compare((src, tgt, 4, 7))
    flips = [p[0].flip for t in range(3) for p in TrainLoader(src, tgt, 4, 7).plans(t)]
    assert any(flips) and not all(flips)  # both branches were compared


def _gta_like(root, n=3):
    """Odd sizes: 17:9 images, one label smaller than its image (as a few GTA5 files are)."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        h, w = 131, 239
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:05d}.png")
        lh, lw = (h, w) if i else (127, 233)
        ids = np.where(rng.random((lh, lw)) < 0.5, 7, 26).astype(np.uint8)
        ids[:lh // 3] = 11
        im = Image.frombytes("P", (lw, lh), ids.tobytes())
        im.putpalette([0] * 768)
        im.save(root / "labels" / f"{i:05d}.png")


def test_dali_cpu_matches_torch_with_padding_odd_sizes_and_day_refs(tmp_path):
    from test_prepare import make_darkzurich

    from sepico_fast.prepare import prepare

    _gta_like(tmp_path / "gta")
    make_darkzurich(tmp_path / "dz")
    prepare("gta", tmp_path / "gta", workers=0, progress=False)
    prepare("darkzurich", tmp_path / "dz", workers=0, progress=False)
    # resized 131x239 -> 88x160: the 96x96 crop is taller than the image, so labels get 255 rows
    src, tgt, _ = build_datasets("gta", "darkzurich", source_root=tmp_path / "gta", target_root=tmp_path / "dz",
                                 source_scale=(160, 90), target_scale=(40, 20), crop_size=(96, 96),
                                 rcs_min_pixels=20, rcs_min_crop_pixels=10)
    batches = _compare((src, tgt, 3, 1), iters=4)
    gt = batches[0][0]["gt"]
    assert (gt[:, :, 88:] == 255).all() and (gt[:, :, :88] != 255).any()
    assert "ref_img" in batches[0][1]
