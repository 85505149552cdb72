"""NVIDIA DALI rendering of the training plans (``TrainLoader(pipeline="dali")``).

The host draws the same plans as the PyTorch pipeline (``plans.plan_sample``: rare class,
file, crop window with its re-draws, flip) and feeds them, with the encoded file bytes,
through ``fn.external_source``; DALI then decodes and renders them:

* decode: ``fn.decoders.image`` with ``device="mixed"`` (JPEG on the GPU with nvJPEG; PNG on
  DALI's CPU threads, then uploaded), ``"cpu"`` without a GPU (``device_id=None``);
* source image: ``fn.resize`` of only the crop window's input region (``roi_start``/``roi_end``)
  to the window size, linear, no anti-aliasing, which samples the same positions as
  resizing the whole image and cropping; flip; ``fn.crop_mirror_normalize`` (→ CHW float);
  ``fn.pad`` to the crop size with 0;
* source label: integer ``fn.slice`` of the input rows/columns the window reads, then
  nearest-neighbour ``fn.resize`` with the ROI moved by half an output pixel (DALI samples
  pixel centres, floor((i + ½)·s); the torch pipeline and OpenCV use floor(i·s)) plus a
  small epsilon so float32 rounding cannot cross an integer; flip; ``fn.pad`` with 255;
* target (and Dark Zurich day reference): whole-image linear resize, flip, normalise.

Labels come out identical to the torch pipeline; images differ by at most one uint8 level
on a few percent of the pixels (float rounding of the bilinear weights), i.e. 1/std ≤ 0.0175
after normalising (tests/test_data_dali.py measures both).

Each DDP rank builds its own pipeline on its own GPU (``device_id=torch.cuda.current_device()``)
and renders its own plans (plans are keyed by rank), so ranks never overlap.
"""
from __future__ import annotations

import numpy as np
import torch

from .labels import IGNORE_INDEX, MEAN, STD
from .plans import plan_sample

# Half an output pixel of slack, in units of the output grid: the exact source coordinate
# floor((y0+i)·H/h) has a fractional part that is a multiple of 1/h, so shifting by 0.5/h
# keeps it off integers by at least 0.5/h whatever float32 rounding does to it.
_NN_EPS = 0.5


class _BytesCache:
    """Encoded file bytes, kept in memory for in-memory datasets (the synthetic pair)."""

    def __init__(self, keep: bool):
        self.keep, self.cache = keep, {}

    def __call__(self, path) -> np.ndarray:
        key = str(path)
        if key in self.cache:
            return self.cache[key]
        data = np.fromfile(key, dtype=np.uint8)
        if self.keep:
            self.cache[key] = data
        return data


def _f32(*values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _source_sample_args(ds, plan, read):
    """External-source values of one source sample (see module docstring for the maths)."""
    e = ds.entries[plan.index]
    h0, w0 = ds.size(plan.index)
    rh, rw = plan.resized
    win = plan.window
    sy, sx = h0 / rh, w0 / rw
    img_start = _f32(win.y0 * sy, win.x0 * sx)
    img_end = _f32((win.y0 + win.h) * sy, (win.x0 + win.w) * sx)
    # label: rows floor((y0+i)·h0/rh) for i < h, read through a slice starting at row r0
    lh0, lw0 = ds.label_size(plan.index)
    ly, lx = lh0 / rh, lw0 / rw
    r0, c0 = (win.y0 * lh0) // rh, (win.x0 * lw0) // rw
    r1, c1 = ((win.y0 + win.h - 1) * lh0) // rh + 1, ((win.x0 + win.w - 1) * lw0) // rw + 1
    lbl_start = _f32(win.y0 * ly - r0 - 0.5 * ly + _NN_EPS / rh, win.x0 * lx - c0 - 0.5 * lx + _NN_EPS / rw)
    lbl_end = lbl_start + _f32(win.h * ly, win.w * lx)
    return (read(e.image), read(e.label), _f32(win.h, win.w), img_start, img_end,
            np.asarray([r0, c0], np.int32), np.asarray([r1 - r0, c1 - c0], np.int32), lbl_start, lbl_end,
            np.asarray([int(plan.flip)], np.int32))


class _PlanFeed:
    """Batch callback of ``fn.external_source(batch=True, batch_info=True)``.

    DALI passes the iteration number since the pipeline started, so the feed is a pure
    function of it and can run in DALI's Python worker processes (``parallel=True``) in any
    order; it only needs picklable datasets (their in-memory caches are not pickled).
    """

    def __init__(self, loader):
        self.source, self.target = loader.source, loader.target
        self.batch_size, self.seed, self.rank = loader.batch_size, loader.seed, loader.rank
        self.start = loader.start_iter
        self.stop = None if loader.num_iters is None else loader.start_iter + loader.num_iters
        self.read = _BytesCache(loader.source.in_memory and loader.target.in_memory)

    def __call__(self, info):
        t = self.start + info.iteration
        if self.stop is not None and t >= self.stop:
            raise StopIteration
        plans = [plan_sample(self.source, self.target, self.seed, t, slot, self.rank)
                 for slot in range(self.batch_size)]
        cols = [list(c) for c in zip(*(_source_sample_args(self.source, sp, self.read) for sp, _ in plans))]
        tgt_bytes, tgt_size, tgt_flip, ref_bytes = [], [], [], []
        for _, tp in plans:
            e = self.target.entries[tp.index]
            tgt_bytes.append(self.read(e.image))
            tgt_size.append(_f32(*tp.resized))
            tgt_flip.append(np.asarray([int(tp.flip)], np.int32))
            if self.target.has_ref:
                ref_bytes.append(self.read(e.ref))
        out = cols + [tgt_bytes, tgt_size, tgt_flip]
        return tuple(out + ([ref_bytes] if self.target.has_ref else []))


def build_pipeline(loader, device_id: int | None, num_threads: int = 4, prefetch: int = 2, py_workers: int = 0):
    """The DALI pipeline of a TrainLoader; ``device_id=None`` builds a CPU-only graph.

    ``py_workers`` > 0 computes the host plans (which decode labels for the cat_max_ratio
    and rare-class re-draws) in that many DALI Python worker processes.
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    has_ref = loader.target.has_ref
    crop_h, crop_w = loader.source.crop_size
    num_inputs = 13 + int(has_ref)
    parallel = py_workers > 0
    extra = {}
    if parallel:  # fork is cheap but unsafe once CUDA is initialised in this process
        fork_ok = not (torch.cuda.is_available() and torch.cuda.is_initialized())
        extra = dict(py_num_workers=py_workers, py_start_method="fork" if fork_ok else "spawn")

    @pipeline_def(batch_size=loader.batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, **extra)
    def graph():
        inputs = fn.external_source(source=_PlanFeed(loader), num_outputs=num_inputs, batch=True, batch_info=True,
                                    parallel=parallel)
        (img_bytes, lbl_bytes, win_size, img_start, img_end, lbl_anchor, lbl_shape, lbl_start, lbl_end, flip,
         tgt_bytes, tgt_size, tgt_flip) = inputs[:13]
        decode = "mixed" if gpu else "cpu"
        norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=list(MEAN), std=list(STD))

        img = fn.decoders.image(img_bytes, device=decode, output_type=types.RGB)
        img = fn.resize(img, size=win_size, roi_start=img_start, roi_end=img_end, interp_type=types.INTERP_LINEAR,
                        antialias=False)
        img = fn.flip(img, horizontal=flip)
        img = fn.crop_mirror_normalize(img, **norm)
        img = fn.pad(img, axes=(1, 2), shape=(crop_h, crop_w), fill_value=0.0)

        lbl = fn.decoders.image(lbl_bytes, device="cpu", output_type=types.GRAY)
        if gpu:
            lbl = lbl.gpu()
        lbl = fn.slice(lbl, lbl_anchor, lbl_shape, axes=(0, 1), normalized_anchor=False, normalized_shape=False)
        lbl = fn.resize(lbl, size=win_size, roi_start=lbl_start, roi_end=lbl_end, interp_type=types.INTERP_NN,
                        antialias=False)
        lbl = fn.flip(lbl, horizontal=flip)
        lbl = fn.pad(lbl, axes=(0, 1), shape=(crop_h, crop_w), fill_value=IGNORE_INDEX)

        outs = [img, lbl]
        for enc in [tgt_bytes] + ([inputs[13]] if has_ref else []):
            t = fn.decoders.image(enc, device=decode, output_type=types.RGB)
            t = fn.resize(t, size=tgt_size, interp_type=types.INTERP_LINEAR, antialias=False)
            t = fn.flip(t, horizontal=tgt_flip)
            outs.append(fn.crop_mirror_normalize(t, **norm))
        return tuple(outs)

    pipe = graph()
    pipe.build()
    return pipe


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """A DALI TensorList of equal-shaped samples copied into one new torch tensor on ``device``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = out.as_tensor()
    arr = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, arr, cuda_stream=stream)
    return arr


def iterate_dali(loader):
    """Generator of (source_batch, target_batch) rendered by DALI (see TrainLoader)."""
    device = loader.device
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    pipe = build_pipeline(loader, device_id, num_threads=max(2, loader.num_workers),
                          py_workers=loader.num_workers)
    has_ref = loader.target.has_ref
    try:
        while True:
            try:
                outs = pipe.run()
            except StopIteration:
                return
            img = _to_torch(outs[0], device)
            gt = _to_torch(outs[1], device)[..., 0].to(torch.int64)[:, None]  # [B,h,w,1] uint8 → [B,1,h,w]
            tgt = {"img": _to_torch(outs[2], device)}
            if has_ref:
                tgt["ref_img"] = _to_torch(outs[3], device)
            yield {"img": img, "gt": gt}, tgt
    finally:
        del pipe
