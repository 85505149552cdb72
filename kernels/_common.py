"""Launch helpers shared by the Triton kernels of ``sepico_fast.kernels``.

Precision policy of every kernel (one rule, so the kernels stay comparable):

* loads are upcast to fp32, all sums, soft-maxes and reductions run in fp32;
* tensor-core products (``tl.dot``) take operands in ``dot_dtype``: the feature dtype for
  fp16/bf16 features (their values are exact there; the fp32 statistics are rounded to it,
  which moves a logit z·μ/τ by ~1e-6 — far below the bf16 rounding of the gradient written
  out), and fp32 with ``input_precision="tf32x3"`` for fp32 features (≈ fp32-exact products
  on tensor cores instead of plain TF32, whose 10-bit mantissa would cost ~1e-4);
* under ``TRITON_INTERPRET=1`` bf16 operands are replaced by fp32: the interpreter computes
  bf16 ``tl.dot`` wrongly (numpy has no bf16), while fp16 operands work there and exercise
  the same half-precision code path.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if interpreting():  # Triton <= 3.6 interpreter vs numpy >= 2.4 (see _interpreter_compat)
    from . import _interpreter_compat

    _interpreter_compat.install()


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse tensors Triton cannot run on, with a message that says what to do."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(
            f"sepico_fast.kernels needs CUDA tensors (got a tensor on {t.device}); on the CPU set "
            "TRITON_INTERPRET=1 before importing triton, or use impl='torch'")


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current for a launch: Triton launches on the current device and
    stream, which need not be the tensors' device (e.g. cuda:1 without set_device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_blocks(block_n: int | None, block_a: int | None) -> None:
    """Tile overrides must be powers of two >= 16: tl.arange needs a power of two and a
    compiled tl.dot needs every dimension >= 16 (the interpreter accepts less)."""
    for name, value in (("block_n", block_n), ("block_a", block_a)):
        if value is None:
            continue
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be None or a power of two >= 16, got {value!r}")


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor); tl.dot needs every block dim >= 16."""
    p = floor
    while p < n:
        p *= 2
    return p


def dot_dtype(feat_dtype: torch.dtype):
    """Operand dtype of tl.dot for features of ``feat_dtype`` (see the module docstring)."""
    if feat_dtype == torch.float32:
        return tl.float32
    if feat_dtype == torch.bfloat16 and interpreting():
        return tl.float32
    if feat_dtype in (torch.float16, torch.bfloat16):
        return _TL_DTYPE[feat_dtype]
    raise ValueError(f"feat: expected float32, float16 or bfloat16, got {feat_dtype}")


def dot_precision(dtype) -> str | None:
    """``input_precision`` for tl.dot: fp32-accurate 3xTF32 for fp32 operands."""
    return "tf32x3" if dtype == tl.float32 else None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device (cached by torch, no sync); None in the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
