"""Per-device choice of kernels and memory formats in the segmentors.

The choices were measured on the CPU (bench/NOTES.md, "Whole iteration"); on CUDA the
modules keep ``F.conv2d`` (cuDNN) until the GPU benchmark measures otherwise.

Every module that makes such a choice has the attribute ``upstream_layout`` (False by
default). ``Segmentor.use_upstream_layout()`` sets it on the whole model to reproduce the
authors' dataflow for the benchmark baseline (``bench/upstream_step.py``): ``F.conv2d``
for every convolution and contiguous NCHW copies exactly where their code makes them.
"""
from __future__ import annotations

import torch


def exporting() -> bool:
    """True while TorchScript tracing or an ONNX / ``torch.export`` export records the model:
    an exported graph runs on any device, so it gets the portable ``F.conv2d``."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def use_cpu_kernels(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """True where the CPU's own kernel choices apply (the shifted-tap convolutions of
    ``conv_taps`` instead of ``F.conv2d``, explicit attention for short key maps): on the
    CPU, in eager mode and under ``torch.compile``, not in an exported graph."""
    return x.device.type == "cpu" and not module.upstream_layout and not exporting()


def use_cpu_nchw(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """True where a map is made contiguous NCHW for the layers after it: on the CPU."""
    return x.device.type == "cpu" and not module.upstream_layout
