"""Argument checks and implementation dispatch shared by the contrast ops.

Every check here is cheap and raises ``ValueError`` naming the argument. Checks that
depend on tensor *values* (label range, finite statistics) must not stall a CUDA
stream: on CUDA they are queued with ``torch._assert_async`` (the error surfaces at
a later synchronisation as a bare "device-side assert triggered": CUDA drops the
message), on the CPU they are evaluated eagerly and raise ``ValueError``. Debug checks
(``SEPICO_FAST_DEBUG_CHECKS=1`` (or true/yes/on), ``set_debug_checks(True)``, the trainer's
``--debug-checks``) evaluate them eagerly everywhere, with the readable message, at the
cost of one host sync per check.

``sepico_fast.dispatch.resolve_impl`` picks the Triton kernels for CUDA tensors (the
``TRITON`` backend registered here); when it has to take the torch reference for CUDA
tensors instead it logs one WARNING per op and reason (logger ``sepico_fast.contrast``).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from ..dispatch import Backend, register

DEBUG_CHECKS_ENV = "SEPICO_FAST_DEBUG_CHECKS"
# The ops with a Triton kernel (implementation_report lists them).
TRITON_OPS = ("dist_contrast_loss", "proto_contrast_loss", "bank_contrast_loss", "class_moments")

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def debug_checks_from_env(environ=None) -> bool:
    """``SEPICO_FAST_DEBUG_CHECKS``: 1/true/yes/on turn the debug checks on, 0/false/no/off
    (or unset) off, any case; anything else raises ValueError naming the variable."""
    text = (os.environ if environ is None else environ).get(DEBUG_CHECKS_ENV, "").strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ValueError(f"{DEBUG_CHECKS_ENV}: expected 1/true/yes/on or 0/false/no/off, got "
                     f"{(os.environ if environ is None else environ)[DEBUG_CHECKS_ENV]!r}")


try:
    _debug_checks = debug_checks_from_env()
except ValueError:  # an unrecognised value: off here; the trainer's command line refuses it in one line
    _debug_checks = False


def set_debug_checks(enabled: bool) -> None:
    """Eager value checks with readable messages on every device (one host sync each)."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks() -> bool:
    return _debug_checks


def check_value(cond: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the boolean tensor ``cond`` is all true.

    CPU, or any device under debug checks: eager check. CUDA (or any non-CPU device), and
    under torch.compile: asynchronous device assertion, no host synchronisation.
    """
    cond = cond.all() if cond.dim() else cond
    # Under torch.compile the check is an op in the graph (no graph break): a failure raises
    # at run time from _assert_async, with the message, on every device.
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message)
    elif cond.device.type == "cpu" or _debug_checks:
        if not bool(cond):
            raise ValueError(message)
    else:
        torch._assert_async(cond, message)


def check_features(feat: torch.Tensor, name: str = "feat") -> None:
    if not isinstance(feat, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(feat).__name__}")
    if feat.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, A], got shape {tuple(feat.shape)}")
    if not feat.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {feat.dtype}")


def check_labels(labels: torch.Tensor, feat: torch.Tensor, num_classes: int, ignore_index: int,
                 name: str = "labels", values: bool = True) -> None:
    """Shape/dtype checks plus (``values``) the value check 0 <= label < num_classes or
    label == ignore; ``values=False`` for labels that ``prepare_contrast`` made (already
    checked: 7 launches fewer per call)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(labels.shape)}")
    if labels.shape[0] != feat.shape[0]:
        raise ValueError(f"{name} has {labels.shape[0]} entries but feat has {feat.shape[0]} rows")
    if labels.device != feat.device:
        raise ValueError(f"{name} is on {labels.device} but feat is on {feat.device}")
    if values:
        check_label_values(labels, num_classes, ignore_index, name)
    else:
        check_ignore_index(ignore_index, num_classes)


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int,
                       name: str = "labels") -> None:
    """Every label is a class id 0..C-1 or ``ignore_index`` (no host sync on CUDA)."""
    check_ignore_index(ignore_index, num_classes)
    if labels.numel():
        in_range = ((labels >= 0) & (labels < num_classes)) | (labels == ignore_index)
        check_value(in_range, f"{name} must hold values in 0..{num_classes - 1} or "
                              f"ignore_index={ignore_index}")


def check_ignore_index(ignore_index: int, num_classes: int) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index={ignore_index} collides with a class id "
                         f"(num_classes={num_classes})")


def check_statistic(t: torch.Tensor, name: str, feat: torch.Tensor,
                    shape: tuple[int, ...] | None = None) -> None:
    """A class statistic ``[C, A]`` (or ``shape``) on feat's device, floating and finite."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if shape is None:
        if t.dim() != 2 or t.shape[1] != feat.shape[1]:
            raise ValueError(f"{name} must be [C, A] with A = feat.shape[1] = {feat.shape[1]}, "
                             f"got shape {tuple(t.shape)}")
    elif tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != feat.device:
        raise ValueError(f"{name} is on {t.device} but feat is on {feat.device}")
    if t.numel():
        check_value(torch.isfinite(t), f"{name} contains NaN or Inf")


def check_scalar(value: float, name: str, *, positive: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


_kernels_tried: list = []  # [(sepico_fast.kernels or None, why not)] once tried


def _kernels_import():
    """(``sepico_fast.kernels`` or None, why not) — tried once per process.

    Imported lazily: the kernels package imports triton, which is optional on CPU. The
    result is kept in a plain list, not an ``lru_cache``: torch.compile traces a list read,
    while it traces through a cache wrapper into ``importlib`` and breaks the graph there
    (``load_triton_kernels`` does the import before any tracing)."""
    if not _kernels_tried:
        try:
            _kernels_tried.append((importlib.import_module("sepico_fast.kernels"), ""))
        except Exception as exc:  # triton missing or broken: the torch path still works
            _kernels_tried.append((None, f"{type(exc).__name__}: {exc}"))
    return _kernels_tried[0]


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Oldest GPU the kernels are compiled and checked for (tests/test_triton_sm90_compile.py: sm_75).
_TRITON_MIN_CAPABILITY = (7, 5)


def _capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability (a cached property query, no sync); None without a CUDA runtime."""
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except (AssertionError, RuntimeError):  # CPU build of torch: nothing to check
        return None


def triton_choice(op: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(implementation, reason) that ``impl=None`` picks for ``op`` on ``device``/``dtype``."""
    if device.type != "cuda":
        return "torch", "inputs not on CUDA"
    if dtype is not None and dtype not in _TRITON_DTYPES:
        return "torch", f"{dtype} inputs (the Triton kernels take float32, float16, bfloat16)"
    cap = _capability(device)
    if cap is not None and cap < _TRITON_MIN_CAPABILITY:
        return "torch", (f"GPU sm_{cap[0]}{cap[1]} is older than the kernels' oldest target "
                         f"sm_{_TRITON_MIN_CAPABILITY[0]}{_TRITON_MIN_CAPABILITY[1]}")
    module, error = _kernels_import()
    if module is None:
        return "torch", f"sepico_fast.kernels (Triton) failed to import: {error}"
    if getattr(module, op, None) is None:
        return "torch", f"sepico_fast.kernels has no {op}"
    return "triton", "Triton kernel, CUDA inputs"


# impl=None / "triton" of the contrast ops: the rule of sepico_fast.dispatch.resolve_impl.
TRITON = Backend(family="contrast", fast="triton", fast_name="Triton kernel",
                 fallback_name="torch reference (slower, more memory)", choose=triton_choice)
register(TRITON, TRITON_OPS)


def implementation_report(device: torch.device | str,
                          dtype: torch.dtype | None = None) -> dict[str, tuple[str, str]]:
    """{op: (implementation, reason)} that ``impl=None`` picks on ``device`` (runs nothing)."""
    device = torch.device(device)
    return {op: triton_choice(op, device, dtype) for op in TRITON_OPS}


def triton_kernel(op: str) -> Callable:
    """The Triton kernel for ``op`` (explicit impl="triton"), or a clear ImportError."""
    module, error = _kernels_import()
    if module is None:
        raise ImportError(f"impl='triton' for {op} needs sepico_fast.kernels (Triton), which "
                          f"failed to import: {error}")
    fn = getattr(module, op, None)
    if fn is None:
        raise ImportError(f"impl='triton' for {op}: sepico_fast.kernels has no '{op}'")
    return fn


def load_triton_kernels() -> bool:
    """Import the Triton kernels now, outside ``torch.compile`` tracing, so that compiled code
    finds them without an import (a graph break). False when Triton is not importable (calls
    with impl="triton" then raise the clear ImportError of :func:`triton_kernel`)."""
    try:
        for op in TRITON_OPS:
            triton_kernel(op)
    except ImportError:
        return False
    return True
