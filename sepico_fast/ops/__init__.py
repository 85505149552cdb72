"""Per-iteration pixel ops of self-training (method §6 steps 2, 3, 8): batched, no host syncs.

Each op has a torch implementation that runs anywhere and, for CUDA tensors, a CUDA kernel
from ``csrc/`` (the optional extension ``sepico_fast.ops._C``, exposed as
``torch.ops.sepico_fast.*`` custom ops). ``impl=None`` picks the kernel when the extension
is built and the inputs are on CUDA, else torch; ``impl="torch"`` / ``impl="cuda"`` force
one (``"cuda"`` raises when it cannot run). The first call of each op logs (INFO, logger
``sepico_fast.ops``) which implementation runs; a torch fallback for CUDA inputs is a
WARNING with the reason. ``implementation_report(device)`` lists the choice per op.
"""
from ._dispatch import EXTENSION_AVAILABLE, EXTENSION_STATUS, implementation_report
from .classmix import choose_mix_classes, classmix, mix_mask
from .crop import crop_batch, sample_crop_offsets, score_crop_windows, select_crop_windows
from .pseudo_label import pseudo_label

__all__ = [
    "EXTENSION_AVAILABLE",
    "EXTENSION_STATUS",
    "implementation_report",
    "sample_crop_offsets",
    "score_crop_windows",
    "select_crop_windows",
    "crop_batch",
    "classmix",
    "choose_mix_classes",
    "mix_mask",
    "pseudo_label",
]
