"""Triton kernels of sepico_fast, importable as ``sepico_fast.kernels``.

One file per op: the Triton kernels, the host launcher and the autograd.Function, plus
the same launcher as a ``torch.library`` custom op with a registered backward, which is
what a ``torch.compile``d region calls (opaque to the compiler: no graph break).
``sepico_fast.contrast`` calls these for ``impl="triton"`` after validating its arguments.
Run on CUDA tensors, or on CPU tensors with ``TRITON_INTERPRET=1`` set before triton is
imported (Triton's interpreter: slow, for tests only).
"""
from .bank_contrast import bank_contrast_loss
from .dist_contrast import dist_contrast_loss, proto_contrast_loss
from .moments import class_moments

__all__ = ["dist_contrast_loss", "proto_contrast_loss", "bank_contrast_loss",
           "class_moments"]
