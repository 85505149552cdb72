"""Keeps Triton's CPU interpreter (``TRITON_INTERPRET=1``, tests only) working with numpy >= 2.4.

The interpreter stores every scalar as a one-element 1-D numpy array and, up to Triton 3.6,
turns it into a Python int with ``int(array)``. numpy 2.4 refuses that conversion for
``ndim > 0``, so every ``range()`` over a run-time value (a program id, a kernel argument)
fails with ``TypeError: only 0-dimensional arrays can be converted to Python scalars``.
Triton 3.7+ squeezes the array first. For the older interpreters this module wraps the
interpreter's per-launch tensor patching so that ``__index__`` squeezes too.

Only the interpreter is touched, and only when a probe shows the bug: compiled kernels on
a GPU never go through this code.
"""
from __future__ import annotations

import functools
import types

import numpy as np


def _int_of_scalar_tensor(self) -> int:
    return int(np.asarray(self.handle.data).reshape(-1)[0])


class _RecordingScope:
    """Stands in for the interpreter's patch scope when probing (applies, never restores)."""

    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


def _index_is_broken(patch_lang_tensor) -> bool:
    """Whether the interpreter's ``__index__`` fails on a one-element array (its scalar)."""

    class Probe:
        pass

    try:
        patch_lang_tensor(Probe, _RecordingScope())
        index = Probe.__dict__.get("__index__")
        if index is None:
            return False
        index(types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([3], np.int32))))
    except TypeError:
        return True
    except Exception:  # an interpreter of another shape: leave it alone
        return False
    return False


def install() -> bool:
    """Install the fix when the interpreter needs it; returns whether it did."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_sepico_fast_fixed", False):
        return False
    if not _index_is_broken(original):
        return False

    @functools.wraps(original)
    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        result = original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", _int_of_scalar_tensor)  # restored with the rest
        return result

    patch_lang_tensor._sepico_fast_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
