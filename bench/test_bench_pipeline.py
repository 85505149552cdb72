"""Input pipeline throughput: PyTorch DataLoader vs NVIDIA DALI, on the synthetic pair and at GTA size.

Each case iterates a ``TrainLoader`` (batch 2 source crops + 2 whole target images, as one
SePiCo iteration) for a fixed number of batches after a warm-up pass, and records

* ``images_per_s``: (source + target) images delivered per second of wall time;
* ``cpu_cores_busy``: CPU seconds used by this process and its (joined) worker processes,
  divided by the wall time, i.e. how many cores the pipeline keeps busy;
* ``median_ms``: wall time per batch;
* ``images_per_s_per_core``: images per CPU-second (``images_per_s / cpu_cores_busy``): the
  throughput one core sustains, which is what decides how many cores keep up with a GPU;
* ``per_core_vs_uncached``: on the cached rows, that figure over the uncached row of the same
  pipeline and worker count measured in the same session.

Cases: ``synthetic`` (the built-in pair: 384x216 sources cropped to 128, 256x128 targets; held in
memory after the first pass) and the paper resolution, generated into a temporary folder:
PNG files at GTA/Cityscapes size, 1914x1052 → 1280x704 → 640x640 crops and 2048x1024 →
1280x640 targets, read from disk every time, either decoded in full (``gta_size``) or from
``prepare --cache`` copies at the training scale (``gta_size_png``: lossless, identical
batches; ``gta_size_jpeg``: quality 95, lossy). DALI runs its CPU operators here
(``device="cpu"``); the GPU rows (mixed decode and GPU resize) need a CUDA device and are
skipped otherwise ("not measured: needs a GPU").

    pytest bench/test_bench_pipeline.py -s -k "gta_size and cpu"    # paper size, ~2 min on 2 cores
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench.record import record
from sepico_fast.data import TrainLoader, build_datasets

BENCH = "input_pipeline"
BATCH = 2
try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _gta_size(root):
    """A few real-resolution files in the GTA5 and Cityscapes layouts (smooth content, so PNG sizes are realistic)."""
    from sepico_fast.prepare import prepare

    rng = np.random.default_rng(0)
    gta, cs = root / "gta", root / "cityscapes"
    for d in (gta / "images", gta / "labels"):
        d.mkdir(parents=True)
    yy, xx = np.mgrid[0:1052, 0:1914]
    for i in range(6):
        img = (127 + 60 * np.sin(xx[..., None] / (15 + i) + yy[..., None] / 23 + np.arange(3))
               + rng.normal(0, 6, (1052, 1914, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(gta / "images" / f"{i:05d}.png", compress_level=1)
        ids = np.where(yy > 526, 7, 11).astype(np.uint8)
        ids[600:800, 300 + 100 * i:700 + 100 * i] = 26
        ids[100:400, 1500:1600] = 21
        im = Image.frombytes("P", (1914, 1052), ids.tobytes())
        im.putpalette([0] * 768)
        im.save(gta / "labels" / f"{i:05d}.png", compress_level=1)
    yy, xx = np.mgrid[0:1024, 0:2048]
    for split in ("train", "val"):
        for i in range(4 if split == "train" else 1):
            stem = f"bench_{i:06d}_000019"
            for sub in ("leftImg8bit", "gtFine"):
                (cs / sub / split / "bench").mkdir(parents=True, exist_ok=True)
            img = (127 + 60 * np.cos(xx[..., None] / (17 + i) - yy[..., None] / 29 + np.arange(3))
                   + rng.normal(0, 6, (1024, 2048, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(cs / "leftImg8bit" / split / "bench" / f"{stem}_leftImg8bit.png",
                                      compress_level=1)
            Image.fromarray(np.where(yy > 512, 7, 23).astype(np.uint8)).save(
                cs / "gtFine" / split / "bench" / f"{stem}_gtFine_labelIds.png")
    for fmt in ("png", "jpeg"):  # the training scales: GTA 1280x704, Cityscapes 1280x640
        prepare("gta", gta, workers=0, progress=False, cache=fmt)
        prepare("cityscapes", cs, workers=0, progress=False, cache=fmt)
    return {f"gta_size{'_' + fmt if fmt else ''}": build_datasets("gta", "cityscapes", data_root=root,
                                                                   cache=fmt or "off")[:2]
            for fmt in ("", "png", "jpeg")}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    syn = build_datasets("synthetic", "synthetic")[:2]
    return {"synthetic": syn, **_gta_size(tmp_path_factory.mktemp("gta_size"))}


def _measure(loader_kwargs, sets, iters):
    src, tgt = sets
    # warm-up: the same batches once (fills the synthetic set's in-memory cache of decoded,
    # resized files, as after the first epoch of a run; files on disk are read again anyway,
    # so two batches warm the page cache and the code paths). The measured pass includes
    # starting and joining the workers, as every row does.
    warm = iters if src.in_memory else 2
    for _ in TrainLoader(src, tgt, BATCH, seed=1, num_iters=warm, **loader_kwargs):
        pass
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for s, t in TrainLoader(src, tgt, BATCH, seed=1, num_iters=iters, **loader_kwargs):
        n += 1
    if loader_kwargs.get("device", "cpu") != "cpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return n, wall, cpu, s


CASES = [
    ("synthetic", "torch", 0, "cpu", 300),
    ("synthetic", "torch", 2, "cpu", 300),
    ("synthetic", "dali", 0, "cpu", 300),
    ("synthetic", "dali", 2, "cpu", 300),
    *[(data, pipeline, workers, "cpu", 10) for pipeline, workers in (("torch", 0), ("torch", 2), ("dali", 2))
      for data in ("gta_size", "gta_size_png", "gta_size_jpeg")],
    ("synthetic", "dali", 2, "cuda", 300),
    ("gta_size", "dali", 4, "cuda", 40),
    ("gta_size_jpeg", "dali", 4, "cuda", 40),
]
_PER_CORE: dict[tuple, float] = {}  # (pipeline, workers, device) -> images/s per core of the uncached row


@pytest.mark.parametrize("case,pipeline,workers,device,iters", CASES,
                         ids=[f"{c}-{p}-w{w}-{d}" for c, p, w, d, _ in CASES])
def test_pipeline_throughput(datasets, case, pipeline, workers, device, iters):
    if pipeline == "dali" and not HAVE_DALI:
        pytest.skip("nvidia-dali is not installed")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("not measured: needs a GPU (DALI mixed decode, GPU resize)")
    n, wall, cpu, last = _measure(dict(pipeline=pipeline, num_workers=workers, device=device), datasets[case], iters)
    assert n == iters and last["img"].shape[0] == BATCH
    images = n * 2 * BATCH
    extra = {"images_per_s": round(images / wall, 1), "cpu_cores_busy": round(cpu / wall, 2),
             "cpu_ms_per_image": round(1e3 * cpu / images, 2), "num_workers": workers,
             "images_per_s_per_core": round(images / max(cpu, 1e-9), 2)}
    key = (pipeline, workers, device)
    if case == "gta_size":
        _PER_CORE[key] = extra["images_per_s_per_core"]
    elif case.startswith("gta_size_") and key in _PER_CORE:
        extra["per_core_vs_uncached"] = round(extra["images_per_s_per_core"] / _PER_CORE[key], 2)
    record(BENCH, f"{pipeline}-w{workers}", device,
           {"data": case, "batch": f"{BATCH}+{BATCH}", "crop": list(datasets[case][0].crop_size), "iters": n},
           1e3 * wall / n, extra=extra)
    print(f"    images/s {extra['images_per_s']}, CPU cores busy {extra['cpu_cores_busy']}, images/s per core "
          f"{extra['images_per_s_per_core']}" + (f" ({extra['per_core_vs_uncached']}x uncached)"
                                                   if "per_core_vs_uncached" in extra else ""))
