"""Training input pipelines: ``TrainLoader`` (PyTorch DataLoader workers, or NVIDIA DALI).

Sample ``slot`` of the batch of iteration ``t`` on DDP rank ``rank`` draws all of its random
decisions (rare class, file, crop window and re-draws, flip, target file) from
``sample_rng(seed, t, slot, rank, stream)``, a generator seeded by exactly those numbers.
Batch t is therefore a pure function of (seed, t, rank): no RNG state is carried from one
batch to the next, worker scheduling cannot change a batch, and resuming at iteration t
reproduces the run exactly. Both pipelines draw the same plans on the host and differ
only in who renders them, so they yield the same batches (see tests/test_data_dali.py).
"""
from __future__ import annotations

import itertools
import os
import re
import signal

import numpy as np
import torch

from .datasets import SourceSet, TargetSet
from .io import DataFileError
from .plans import SOURCE_STREAM, TARGET_STREAM, plan_sample, sample_rng  # noqa: F401 (re-exported)

PIPELINES = ("auto", "torch", "dali")


class _SampleSet(torch.utils.data.Dataset):
    """Map-style view of the infinite sample stream: index n ↦ (t, slot) = divmod(n, batch_size)."""

    def __init__(self, train_source, train_target, batch_size, seed, rank):
        self.source, self.target = train_source, train_target
        self.batch_size, self.seed, self.rank = batch_size, seed, rank

    def __getitem__(self, n: int) -> dict:
        t, slot = divmod(int(n), self.batch_size)
        sp, tp = plan_sample(self.source, self.target, self.seed, t, slot, self.rank)
        img, gt = self.source.render(sp)
        out = {"src_img": img, "src_gt": gt}
        for k, v in self.target.render(tp).items():
            out[f"tgt_{k}"] = v
        return out


def collate(samples: list[dict]) -> dict:
    """Stack per-sample tensors with numpy: torch.stack's intra-op threads cost milliseconds
    per call on a busy machine, numpy's single-threaded copy microseconds.

    In a DataLoader worker the batch is stacked straight into shared memory (as torch's
    default_collate does): sending it to the main process then passes a file descriptor
    instead of copying the ~36 MB of a paper-size 2+2 batch into a new shared segment."""
    shared = torch.utils.data.get_worker_info() is not None
    out = {}
    for k in samples[0]:
        first = samples[0][k]
        shape = (len(samples),) + tuple(first.shape)
        if shared:
            storage = first.untyped_storage()._new_shared(first.element_size() * len(samples) * first.numel())
            batch = torch.empty(0, dtype=first.dtype).set_(storage).view(shape)
        else:
            batch = torch.empty(shape, dtype=first.dtype)
        np.stack([s[k].numpy() for s in samples], out=batch.numpy())
        out[k] = batch
    return out


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int | None):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop)) if self.stop is not None else itertools.count(self.start)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the worker processes too;
    they leave it to the main process, which finishes the iteration, writes its checkpoint
    and shuts them down (a worker ending on it made the stop a 'worker exited unexpectedly'
    traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _split(batch: dict, device: torch.device, non_blocking: bool) -> tuple[dict, dict]:
    src = {"img": batch["src_img"].to(device, non_blocking=non_blocking),
           "gt": batch["src_gt"].to(device, non_blocking=non_blocking)}
    tgt = {k[4:]: v.to(device, non_blocking=non_blocking) for k, v in batch.items() if k.startswith("tgt_")}
    return src, tgt


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_num_workers(world_size: int = 1, in_memory: bool = False) -> int:
    """Worker processes per rank when none are given (``--num-workers -1``).

    0 when the data are held in memory (the synthetic pair: a batch costs ~2 ms in the main
    process, less than handing it over from a worker); else the usable CPUs shared among the
    ranks of this machine (``LOCAL_WORLD_SIZE`` under torchrun, else ``world_size``), one
    left to each rank's main process, at least 1 and at most 8 (past that the main process's
    collation and host-to-device copies, not decoding, limit a rank).
    """
    if in_memory:
        return 0
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    ranks = int(local) if local.isdigit() and int(local) > 0 else max(int(world_size), 1)
    return min(8, max(1, usable_cpus() // ranks - 1))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # not installed, or installed without its CUDA libraries
        return False
    return True


class TrainLoader:
    """Infinite iterator of ``(source_batch, target_batch)`` starting at iteration ``start_iter``.

    source_batch: {"img" float32 [B,3,h,w] normalised RGB, "gt" int64 [B,1,h,w] (255 = ignore)}
    target_batch: {"img" float32 [B,3,H,W] whole resized image[, "ref_img" Dark Zurich day reference]
                   [, "gt" int64 [B,1,H,W] when the target set has ``with_labels`` (diagnostics only)]}

    pipeline: "torch" (DataLoader with ``num_workers`` CPU processes), "dali" (NVIDIA DALI:
    decode/resize/crop/flip/normalise on the GPU; CPU operators when ``device`` is the CPU)
    or "auto" (DALI when it imports and ``device`` is a CUDA device, else torch).
    ``num_workers``: worker processes (torch) or threads (DALI); None: ``default_num_workers``.
    ``num_iters`` stops after that many batches (default: never).
    """

    def __init__(self, train_source: SourceSet, train_target: TargetSet, batch_size: int, seed: int,
                 start_iter: int = 0, pipeline: str = "auto", device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, num_workers: int | None = None, num_iters: int | None = None,
                 prefetch: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if start_iter < 0:
            raise ValueError(f"start_iter: expected >= 0, got {start_iter}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline: expected one of {PIPELINES}, got {pipeline!r}")
        self.source, self.target = train_source, train_target
        self.batch_size, self.seed, self.start_iter = int(batch_size), int(seed), int(start_iter)
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_iters = num_iters
        self.prefetch = max(1, int(prefetch))
        if num_workers is None:
            in_memory = train_source.in_memory and train_target.in_memory
            num_workers = default_num_workers(world_size, in_memory)
        if num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
        self.num_workers = int(num_workers)
        # Target labels (--pseudo-diagnostics) are rendered by the torch pipeline only.
        target_labels = getattr(train_target, "with_labels", False)
        if pipeline == "auto":
            pipeline = "dali" if self.device.type == "cuda" and dali_available() and torch.cuda.is_available() \
                and not target_labels else "torch"
        if pipeline == "dali" and target_labels:
            raise ValueError("pipeline: --pseudo-diagnostics needs the target labels, which the DALI pipeline "
                             "does not render; use --pipeline torch (or auto)")
        if pipeline == "dali" and not dali_available():
            raise ValueError("pipeline: 'dali' requested but nvidia.dali is not installed "
                             "(pip install nvidia-dali-cuda130)")
        self.pipeline = pipeline

    def plans(self, t: int):
        """The host-side plans of the batch of iteration t (what both pipelines render)."""
        return [plan_sample(self.source, self.target, self.seed, t, slot, self.rank) for slot in range(self.batch_size)]

    def batch(self, t: int) -> tuple[dict, dict]:
        """Batch of iteration t rendered in this process with the torch pipeline (tests, debugging)."""
        ds = _SampleSet(self.source, self.target, self.batch_size, self.seed, self.rank)
        samples = [ds[t * self.batch_size + s] for s in range(self.batch_size)]
        merged = collate(samples)
        return _split(merged, self.device, False)

    def __iter__(self):
        if self.pipeline == "dali":
            from .dali_pipeline import iterate_dali

            return iterate_dali(self)
        return self._iterate_torch()

    def _iterate_torch(self):
        stop = None if self.num_iters is None else (self.start_iter + self.num_iters) * self.batch_size
        ds = _SampleSet(self.source, self.target, self.batch_size, self.seed, self.rank)
        cuda = self.device.type == "cuda"
        kwargs = dict(num_workers=self.num_workers, pin_memory=cuda)
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=self.prefetch, persistent_workers=False, worker_init_fn=ignore_sigint)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size,
                                             sampler=_CountFrom(self.start_iter * self.batch_size, stop),
                                             drop_last=True, collate_fn=collate, **kwargs)
        try:
            for batch in loader:
                yield _split(batch, self.device, cuda)
        except RuntimeError as exc:
            err = worker_data_error(exc)
            if err is None:
                raise
            raise err from None


_WORKER_DATA_ERROR = re.compile(r"DataFileError: cannot (\w+) (.+?): (.*)$")


def worker_data_error(exc: BaseException) -> DataFileError | None:
    """The DataFileError behind a DataLoader worker failure, or None.

    torch re-raises a worker's exception in the main process by calling its type with one
    formatted-traceback message; DataFileError takes (path, reason), so torch falls back to
    a RuntimeError carrying that text. Its last line still names the file: rebuild it."""
    text = str(exc)
    if "DataFileError" not in text:
        return None
    for line in reversed(text.strip().splitlines()):
        m = _WORKER_DATA_ERROR.search(line.strip())
        if m:
            return DataFileError(m.group(2), m.group(3), m.group(1))
    return None
