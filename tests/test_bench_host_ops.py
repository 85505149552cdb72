"""bench/host_ops.py's counter: non-view aten ops by phase, opaque launches counted once."""
from __future__ import annotations

import torch

from bench.host_ops import OpCounter, _PhaseProfiler, cuda_path, is_view


def test_views_are_not_counted_and_phases_are_kept():
    assert is_view(torch.ops.aten.view.default) and is_view(torch.ops.aten.t.default)
    assert not is_view(torch.ops.aten.add.Tensor) and not is_view(torch.ops.aten.add_.Tensor)
    counter = OpCounter()
    prof = _PhaseProfiler(counter)
    x = torch.randn(4, 3)
    with counter:
        with prof.phase("a"):
            y = (x + 1).view(3, 4).t()  # add; view and t are views
        with prof.phase("b"):
            y.mul_(2)
            with counter.suspended():
                y.sum()
    assert counter.by_phase == {"a": 1, "b": 1} and counter.total == 2
    assert counter.by_op == {"add": 1, "mul_": 1}


def test_cuda_path_switches_the_cpu_kernel_choices_off():
    from sepico_fast.models import heads, mit

    x = torch.zeros(1)
    module = torch.nn.Module()
    module.upstream_layout = False
    assert mit.use_cpu_kernels(module, x) and heads.use_cpu_nchw(module, x)
    with cuda_path(OpCounter(), kernels=False):
        assert not mit.use_cpu_kernels(module, x) and not heads.use_cpu_kernels(module, x)
        assert not heads.use_cpu_nchw(module, x)
    assert mit.use_cpu_kernels(module, x)


def test_cuda_path_picks_the_triton_losses_on_cpu_tensors():
    """With kernels=True the dispatch rule answers "triton" for every contrast op (as on a
    GPU), and the torch reference again afterwards."""
    from sepico_fast.contrast import validation
    from sepico_fast.dispatch import resolve_impl

    cpu = torch.device("cpu")
    with cuda_path(None):
        assert {resolve_impl(op, None, cpu, torch.float32) for op in validation.TRITON_OPS} == {"triton"}
    assert {resolve_impl(op, None, cpu, torch.float32) for op in validation.TRITON_OPS} == {"torch"}
