"""Loading of the optional CUDA extension and the choice of implementation per call.

``sepico_fast.ops._C`` is built by setup.py from ``csrc/`` only when torch is a CUDA build
and nvcc is available; importing it registers the ``torch.ops.sepico_fast.*`` custom ops.
``SEPICO_FAST_DISABLE_EXT=1`` skips loading it (forces the torch implementations).
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger("sepico_fast.ops")

_IMPLS = (None, "torch", "cuda")


def _load_extension() -> tuple[bool, str]:
    if os.environ.get("SEPICO_FAST_DISABLE_EXT") == "1":
        return False, "disabled by SEPICO_FAST_DISABLE_EXT=1"
    try:
        importlib.import_module("sepico_fast.ops._C")  # loading registers the custom ops
    except ImportError as exc:
        return False, f"not built ({exc})"
    except OSError as exc:  # built, but e.g. a CUDA library is missing at runtime
        return False, f"failed to load ({exc})"
    return True, "loaded"


EXTENSION_AVAILABLE, EXTENSION_STATUS = _load_extension()
_logged: set[tuple[str, str]] = set()


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


def resolve_impl(op: str, impl: str | None, *tensors: torch.Tensor) -> str:
    """``"cuda"`` or ``"torch"`` for this call; logs the choice once per (op, implementation).

    impl=None picks the extension when it is loaded and every tensor is on a CUDA device.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be None, 'torch' or 'cuda', got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "cuda":
        if not EXTENSION_AVAILABLE:
            raise RuntimeError(f"{op}: impl='cuda' needs the sepico_fast CUDA extension, which is "
                               f"{EXTENSION_STATUS}; rebuild with a CUDA torch and nvcc "
                               "(pip install --no-build-isolation -e .) or use impl='torch'")
        if not on_cuda:
            raise ValueError(f"{op}: impl='cuda' needs CUDA tensors, got devices "
                             f"{sorted({str(t.device) for t in tensors})}")
        chosen, why = "cuda", "requested"
    elif impl == "torch":
        chosen, why = "torch", "requested"
    elif on_cuda and EXTENSION_AVAILABLE:
        chosen, why = "cuda", "extension loaded, CUDA inputs"
    else:
        chosen = "torch"
        why = "inputs not on CUDA" if not on_cuda else f"CUDA extension {EXTENSION_STATUS}"
    # Logging is a side effect torch.compile cannot put in a graph; eager calls log it.
    if not torch.compiler.is_compiling() and (op, chosen) not in _logged:
        _logged.add((op, chosen))
        name = "CUDA extension (csrc/)" if chosen == "cuda" else "torch fallback"
        logger.info("sepico_fast.ops.%s: using the %s (%s)", op, name, why)
    return chosen
