"""The Triton-interpreter fix for numpy >= 2.4 (kernels/_interpreter_compat.py).

Triton <= 3.6 converts its one-element scalar arrays with ``int(array)``, which numpy 2.4
refuses; the fix wraps the interpreter's tensor patching. Tested here against a stand-in
interpreter whose ``__index__`` fails the same way, and end to end on the installed Triton
(a loop over a program id, the construct that broke ``kernels/moments.py``).
"""
import types

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
compat = pytest.importorskip("sepico_fast.kernels._interpreter_compat")


class _Scope:
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, original = self.changes.pop()
            setattr(obj, name, original)


def _buggy_patch(tensor, scope):
    def index(self):
        data = self.handle.data
        if data.ndim:  # numpy >= 2.4 behaviour of int() on a 1-element 1-D array
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return int(data)

    scope.set_attr(tensor, "__index__", index)


def _good_patch(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


def _fake_interpreter(monkeypatch, patch):
    from triton.runtime import interpreter
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch)
    return interpreter


def test_probe_tells_a_broken_interpreter_from_a_fixed_one():
    assert compat._index_is_broken(_buggy_patch)
    assert not compat._index_is_broken(_good_patch)


def test_install_fixes_a_broken_interpreter_and_restores_with_its_scope(monkeypatch):
    interp = _fake_interpreter(monkeypatch, _buggy_patch)
    assert compat.install()
    assert not compat.install(), "installing twice must be a no-op"

    class Tensor:
        pass

    def scalar(value):  # how the interpreter holds a scalar: a one-element 1-D array
        t = Tensor()
        t.handle = types.SimpleNamespace(data=np.array([value], np.int32))
        return t

    scope = _Scope()
    interp._patch_lang_tensor(Tensor, scope)
    assert list(range(scalar(1), scalar(7), scalar(3))) == [1, 4]
    scope.restore()
    assert Tensor.__dict__.get("__index__") is None, "the scope must undo the fix with the rest"


def test_install_leaves_a_working_interpreter_alone(monkeypatch):
    interp = _fake_interpreter(monkeypatch, _good_patch)
    assert not compat.install()
    assert interp._patch_lang_tensor is _good_patch


def test_loop_over_a_program_id_runs_in_the_interpreter():
    from sepico_fast.kernels._common import interpreting
    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU) or a GPU")
    import triton
    import triton.language as tl

    @triton.jit
    def _strided_sum(x_ptr, out_ptr, n, step):
        start = tl.program_id(0)
        acc = 0.0
        for i in range(start, n, step):
            acc += tl.load(x_ptr + i)
        tl.store(out_ptr + start, acc)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.arange(10, dtype=torch.float32, device=dev)
    out = torch.zeros(3, device=dev)
    _strided_sum[(3,)](x, out, 10, 3)
    expected = [sum(range(s, 10, 3)) for s in range(3)]
    assert out.cpu().tolist() == expected
