"""Launch helpers shared by the Triton kernels of ``sepico_fast.kernels``.

Launchers: ``check_device`` / ``check_blocks`` refuse what the kernels cannot take,
``row_block_outputs`` allocates the per-row-block outputs of the contrast kernels and
``launch`` runs a kernel on its tensors' GPU (nothing for an empty grid).

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
from dataclasses import dataclass

import torch
import triton
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


@dataclass
class RowBlockOutputs:
    """Outputs of a contrast forward kernel run over blocks of ``BLOCK_N`` feature rows
    (one program per block): the gradient ``[N, A]`` in the feature dtype (None unless
    written), and fp32 partials per block that the host sums: loss ``[G]``, anchor count
    ``[G]``, valid-pixel count ``[G]`` (None unless asked for), Σz ``[G, A]`` for the
    regulariser (``[1, A]``, unwritten, without it)."""
    num_blocks: int
    grad: torch.Tensor | None
    loss: torch.Tensor
    count: torch.Tensor
    valid: torch.Tensor | None
    zsum: torch.Tensor


def row_block_outputs(feat: torch.Tensor, block_n: int, *, write_grad: bool, has_reg: bool,
                      valid: bool = False) -> RowBlockOutputs:
    """Allocate (uninitialised: every program writes its own entries) the outputs of a
    contrast forward kernel over ``feat`` [N, A] in blocks of ``block_n`` rows."""
    n_rows, a = feat.shape
    dev = feat.device
    num_blocks = triton.cdiv(n_rows, block_n)
    grad = torch.empty((n_rows, a), device=dev, dtype=feat.dtype) if write_grad else None
    loss = torch.empty(num_blocks, device=dev, dtype=torch.float32)
    count = torch.empty(num_blocks, device=dev, dtype=torch.float32)
    valid_part = torch.empty(num_blocks, device=dev, dtype=torch.float32) if valid else None
    zsum = torch.empty((num_blocks, a) if has_reg else (1, a), device=dev, dtype=torch.float32)
    return RowBlockOutputs(num_blocks, grad, loss, count, valid_part, zsum)


def launch(kernel, grid: tuple[int, ...], like: torch.Tensor, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on the GPU of ``like`` (``device_guard``); nothing
    when the grid is empty (a CUDA grid of size 0 is a launch error)."""
    if min(grid) <= 0:
        return
    with device_guard(like):
        kernel[grid](*args, **meta)
