"""Loading of the optional CUDA extension and the choice of implementation per call.

``sepico_fast.ops._C`` is built by setup.py from ``csrc/`` only when torch is a CUDA build
and a CUDA toolkit is found; importing it registers the ``torch.ops.sepico_fast.*`` custom
ops. ``SEPICO_FAST_DISABLE_EXT=1`` skips loading it (forces the torch implementations).
When it cannot run for CUDA inputs (not built, failed to load, no code for the GPU's
architecture) the torch implementation runs instead and one WARNING per op says why; the
install-time reason comes from ``_ext_build.json``, written by setup.py.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from .._cuda_toolkit import archs_text, extension_runs_on
from ..dispatch import Backend, register

# The ops with a CUDA kernel, by the names they log under (implementation_report).
CUDA_OPS = ("score_crop_windows", "select_crop_windows", "classmix", "pseudo_label")
_STATUS_FILE = Path(__file__).with_name("_ext_build.json")


def _install_note() -> tuple[str, str]:
    """(state, detail) that setup.py recorded for the extension; ("", "") when unknown."""
    try:
        record = json.loads(_STATUS_FILE.read_text())
    except (OSError, ValueError):
        return "", ""
    return str(record.get("state", "")), str(record.get("detail", ""))


def _load_extension() -> tuple[bool, str]:
    if os.environ.get("SEPICO_FAST_DISABLE_EXT") == "1":
        return False, "disabled by SEPICO_FAST_DISABLE_EXT=1"
    try:
        importlib.import_module("sepico_fast.ops._C")  # loading registers the custom ops
    except ImportError as exc:
        state, detail = _install_note()
        if state == "failed":
            return False, f"not built: its build failed at install ({detail})"
        if state == "skipped":
            return False, f"not built at install ({detail})"
        return False, f"not built ({exc})"
    except OSError as exc:  # built, but e.g. a CUDA library is missing at runtime
        return False, f"failed to load ({exc})"
    return True, "loaded"


EXTENSION_AVAILABLE, EXTENSION_STATUS = _load_extension()


def extension_status(device: torch.device | str) -> tuple[bool, str]:
    """(runs, reason): whether the extension runs for CUDA inputs on ``device``, and why (not)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, "inputs not on CUDA"
    if not EXTENSION_AVAILABLE:
        return False, f"CUDA extension {EXTENSION_STATUS}"
    major, minor = torch.cuda.get_device_capability(device)  # a cached property query
    if not extension_runs_on((major, minor)):
        return False, (f"CUDA extension has no code for this GPU (sm_{major}{minor}; "
                       f"built for {archs_text()})")
    return True, "extension loaded, CUDA inputs"


def _register_fakes() -> None:
    """Shape functions of the custom ops, so torch.compile / FakeTensor tracing works."""

    @torch.library.register_fake("sepico_fast::crop_window_scores")
    def _crop_window_scores_fake(labels, offsets, crop_h, crop_w, num_classes, cat_max_ratio,
                                 ignore_index):
        batch, windows = offsets.shape[0], offsets.shape[1]
        return (labels.new_empty((batch, windows), dtype=torch.float32),
                labels.new_empty((batch, 2), dtype=torch.int64))

    @torch.library.register_fake("sepico_fast::classmix")
    def _classmix_fake(src_img, tgt_img, src_lbl, tgt_lbl, tgt_weight, mix_classes):
        return torch.empty_like(src_img), torch.empty_like(src_lbl), torch.empty_like(tgt_weight)

    @torch.library.register_fake("sepico_fast::pseudo_label")
    def _pseudo_label_fake(logits, threshold):
        batch, _, height, width = logits.shape
        return (logits.new_empty((batch, height, width), dtype=torch.float32),
                logits.new_empty((batch, height, width), dtype=torch.int64),
                logits.new_empty((), dtype=torch.float32))


if EXTENSION_AVAILABLE:
    _register_fakes()


def _check_extension_runs(op: str, device: torch.device) -> None:
    """Explicit impl='cuda': the extension must be loaded and run on ``device``."""
    if not EXTENSION_AVAILABLE:
        raise RuntimeError(f"{op}: impl='cuda' needs the sepico_fast CUDA extension, which is "
                           f"{EXTENSION_STATUS}; rebuild with a CUDA torch and nvcc "
                           "(pip install --no-build-isolation -e .) or use impl='torch'")
    if device.type != "cuda":
        raise ValueError(f"{op}: impl='cuda' needs CUDA tensors, got device {device}")
    runs, why = extension_status(device)
    if not runs:
        raise RuntimeError(f"{op}: impl='cuda' cannot run: {why}; use impl='torch'")


def _extension_choice(op: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(implementation, reason) that impl=None picks for inputs on ``device``."""
    runs, why = extension_status(device)
    return ("cuda" if runs else "torch"), why


# impl=None / "cuda" of the ops: the rule of sepico_fast.dispatch.resolve_impl. The callers
# check first that all their tensors are on one device and pass that device.
EXTENSION = Backend(family="ops", fast="cuda", fast_name="CUDA extension (csrc/)",
                    fallback_name="slower torch fallback", choose=_extension_choice,
                    check_fast=_check_extension_runs)
register(EXTENSION, CUDA_OPS)


def implementation_report(device: torch.device | str) -> dict[str, tuple[str, str]]:
    """{op: (implementation, reason)} that ``impl=None`` picks for inputs on ``device``.

    Runs nothing; the trainer prints it once at start. Float64 images in classmix always
    take torch (not listed: training images are fp32 or 16-bit).
    """
    runs, why = extension_status(device)
    impl = "cuda" if runs else "torch"
    return {op: (impl, why) for op in CUDA_OPS}
